package buffer

import (
	"bytes"
	"slices"
	"testing"
)

// TestSlabReferences: a slab's copies read back intact; each queue that keeps lines
// takes one reference per run (RetainLines) and gives it back (ReleaseLines); after the
// slab recycles and closes, no reference is left on any chunk it filled, and a line too
// large for a chunk gets a buffer of its own.
func TestSlabReferences(t *testing.T) {
	var s Slab
	var lines []Payload
	line := bytes.Repeat([]byte("x"), 1000)
	for i := range 200 { // about three chunks
		line[0] = byte(i)
		lines = append(lines, s.Copy(line))
	}
	big := s.Copy(make([]byte, ChunkSize))
	if big.Ref != nil {
		t.Fatal("a line larger than a quarter chunk was copied into a chunk")
	}
	chunks := map[*Chunk]bool{}
	for i, p := range lines {
		if len(p.Data) != 1000 || p.Data[0] != byte(i) {
			t.Fatalf("line %d reads back wrong", i)
		}
		chunks[p.Ref] = true
	}
	if len(chunks) < 3 {
		t.Fatalf("200 lines of 1000 bytes in %d chunks", len(chunks))
	}
	RetainLines(lines) // a queue keeps them
	s.Recycle()
	s.Close()
	for c := range chunks {
		if c.Refs() == 0 {
			t.Fatal("a chunk a queue still holds lost its last reference")
		}
	}
	ReleaseLines(lines) // the queue wrote them
	for c := range chunks {
		if n := c.Refs(); n != 0 {
			t.Fatalf("a chunk has %d references after every holder released it", n)
		}
	}
}

// TestRun: lines copied with their delimiter form a run as long as they adjoin in one
// chunk, within the bounds; a line copied without one, a line of another chunk, or one
// that is not in a chunk ends it; the run's bytes are the lines with their delimiters.
func TestRun(t *testing.T) {
	var s Slab
	defer s.Close()
	lines := []Payload{s.CopyLine([]byte("ab"), '\n'), s.CopyLine([]byte(""), '\n'), s.CopyLine([]byte("cd"), '\n')}
	if n, run := Run(lines, '\n', 1<<10, 100); n != 3 || string(run) != "ab\n\ncd\n" {
		t.Fatalf("Run = %d %q, want 3 \"ab\\n\\ncd\\n\"", n, run)
	}
	if n, _ := Run(lines, '\f', 1<<10, 100); n != 0 {
		t.Fatalf("lines ended by '\\n' made a run of %d for '\\f'", n)
	}
	if n, run := Run(lines, '\n', 4, 100); n != 2 || string(run) != "ab\n\n" {
		t.Fatalf("Run within 4 bytes = %d %q, want 2 \"ab\\n\\n\"", n, run)
	}
	if n, _ := Run(lines, '\n', 1<<10, 2); n != 2 {
		t.Fatalf("Run of at most 2 lines = %d", n)
	}
	// A copy without a delimiter: the byte after it is the next copy's, not a delimiter.
	plain := []Payload{s.Copy([]byte("ef")), s.CopyLine([]byte("gh"), '\n')}
	if n, _ := Run(plain, '\n', 1<<10, 100); n != 0 {
		t.Fatalf("a line copied without its delimiter began a run of %d", n)
	}
	// The last line of a chunk: its delimiter is the chunk's last filled byte.
	var t2 Slab
	defer t2.Close()
	var full []Payload
	for range ChunkSize / 8 {
		full = append(full, t2.CopyLine([]byte("1234567"), '\n'))
	}
	next := t2.CopyLine([]byte("x"), '\n')
	if next.Ref == full[0].Ref {
		t.Fatal("the chunk had room for another line")
	}
	all := append(full[len(full)-2:], next)
	if n, _ := Run(all, '\n', 1<<20, 1<<20); n != 2 {
		t.Fatalf("a run across two chunks: %d lines, want 2", n)
	}
	if n, _ := Run([]Payload{{Data: []byte("x\n")[:1]}}, '\n', 1<<10, 100); n != 0 {
		t.Fatal("a line outside any chunk began a run")
	}
}

// TestMessages: a run splits into its messages, empty ones included, without their
// delimiters; bytes after the last delimiter are not a message; a consumer may stop early.
func TestMessages(t *testing.T) {
	var got []string
	for m := range Messages([]byte("ab\n\ncd\nrest"), '\n') {
		got = append(got, string(m))
	}
	if want := []string{"ab", "", "cd"}; !slices.Equal(got, want) {
		t.Fatalf("Messages = %q, want %q", got, want)
	}
	n := 0
	for range Messages([]byte("a\fb\fc\f"), '\f') {
		if n++; n == 2 {
			break
		}
	}
	if n != 2 {
		t.Fatalf("stopped after %d messages, want 2", n)
	}
}
