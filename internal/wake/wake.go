// Package wake is the one way the project signals a goroutine that waits for work on a
// channel of capacity one: a send that never blocks, because a signal already pending
// says the same thing.
package wake

// Up signals c without blocking. c has capacity one and is drained by the goroutine it
// wakes, which then looks at the state the signal is about, so a signal lost to a full
// c loses nothing.
func Up(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
