package peertls_test

import (
	"crypto/aes"
	"crypto/cipher"
	"testing"
)

// BenchmarkRecordCipher seals and opens one full TLS 1.3 record (16 KiB of plaintext)
// with the AEADs crypto/tls negotiates for TLS 1.3 on a CPU with AES instructions
// (ChaCha20-Poly1305 only where there are none). It is the floor of what mutual TLS adds
// per byte to a peer link, one encryption in the sending sidecar and one decryption in the
// receiving one, whatever the code around crypto/tls does: docs/performance.md §4 adds it
// to a 1 KiB line's plaintext CPU to bound the mTLS/plaintext ratio on a CPU-bound machine.
func BenchmarkRecordCipher(b *testing.B) {
	key := make([]byte, 32)
	aeads := []struct {
		name string
		new  func() (cipher.AEAD, error)
	}{
		{"AES-128-GCM", func() (cipher.AEAD, error) { return gcm(key[:16]) }},
		{"AES-256-GCM", func() (cipher.AEAD, error) { return gcm(key) }},
	}
	for _, a := range aeads {
		b.Run(a.name, func(b *testing.B) {
			aead, err := a.new()
			if err != nil {
				b.Fatal(err)
			}
			const record = 16 << 10
			plain := make([]byte, record)
			nonce := make([]byte, aead.NonceSize())
			header := []byte{23, 3, 3, 0x40, 0x11} // application_data, TLS 1.2 on the wire, length
			sealed := make([]byte, 0, record+aead.Overhead())
			opened := make([]byte, 0, record)
			b.SetBytes(record)
			b.ReportAllocs()
			for b.Loop() {
				nonce[len(nonce)-1]++
				sealed = aead.Seal(sealed[:0], nonce, plain, header)
				if opened, err = aead.Open(opened[:0], nonce, sealed, header); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func gcm(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}
