package buffer

import (
	"bytes"
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
