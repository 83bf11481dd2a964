package peer

// wake signals c, a channel of capacity one that a single goroutine waits on, without
// blocking: a signal already pending says the same.
func wake(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
