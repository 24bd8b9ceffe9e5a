//! A small bounded queue of messages to one task, for the programs' per-channel signalling.
//!
//! A relay or an endpoint holds thousands of idle channels, each told what to do now and then
//! by another task. A tokio `mpsc` channel allocates a block of 32 slots up front (kilobytes
//! per channel for messages of a few words); a [`Mailbox`] holds only what it is sent, and is
//! one allocation with the state it sits in.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

/// Messages in order to one reader task, at most `capacity` unread; closed by either side.
#[derive(Debug)]
pub struct Mailbox<T> {
    state: Mutex<State<T>>,
    capacity: usize,
}

#[derive(Debug)]
struct State<T> {
    messages: VecDeque<T>,
    /// The reader, waiting for a message.
    reader: Option<Waker>,
    closed: bool,
}

impl<T> Mailbox<T> {
    /// An empty mailbox that holds at most `capacity` unread messages.
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                messages: VecDeque::new(),
                reader: None,
                closed: false,
            }),
            capacity,
        }
    }

    /// Queues `message` and wakes the reader; gives the message back if the mailbox is full
    /// or closed.
    pub fn send(&self, message: T) -> Result<(), T> {
        let reader = {
            let mut state = self.state.lock();
            if state.closed || state.messages.len() >= self.capacity {
                return Err(message);
            }
            state.messages.push_back(message);
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }

    /// The next message; `None` once the mailbox is closed and read to its end. When there is
    /// nothing yet, the reader (`cx`) is woken when something comes or the mailbox closes.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.state.lock();
        if let Some(message) = state.messages.pop_front() {
            return Poll::Ready(Some(message));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        if !state
            .reader
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Closes the mailbox: later messages are refused; the reader gets those already sent,
    /// then `None`.
    pub fn close(&self) {
        let reader = {
            let mut state = self.state.lock();
            state.closed = true;
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// Closes the mailbox and drops the messages not read (the reader has gone).
    pub fn close_and_clear(&self) {
        let unread = {
            let mut state = self.state.lock();
            state.closed = true;
            state.reader = None;
            std::mem::take(&mut state.messages)
        };
        // Dropped outside the lock: a message may own anything.
        drop(unread);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// Counts its wake-ups.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn messages_come_in_order_within_the_capacity_and_wake_the_reader() {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mailbox = Mailbox::new(2);
        assert_eq!(mailbox.poll_recv(&mut cx), Poll::Pending);
        assert_eq!(mailbox.send(1), Ok(()));
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "the waiting reader is woken"
        );
        assert_eq!(mailbox.send(2), Ok(()));
        assert_eq!(mailbox.send(3), Err(3), "full");
        assert_eq!(mailbox.poll_recv(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(mailbox.poll_recv(&mut cx), Poll::Ready(Some(2)));
        assert_eq!(mailbox.poll_recv(&mut cx), Poll::Pending);
        mailbox.close();
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            2,
            "closing wakes the reader"
        );
        assert_eq!(mailbox.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_closed_mailbox_refuses_and_delivers_what_it_holds_unless_cleared() {
        let mut cx = Context::from_waker(Waker::noop());
        let mailbox = Mailbox::new(4);
        assert_eq!(mailbox.send("kept"), Ok(()));
        mailbox.close();
        assert_eq!(mailbox.send("late"), Err("late"));
        assert_eq!(mailbox.poll_recv(&mut cx), Poll::Ready(Some("kept")));
        assert_eq!(mailbox.poll_recv(&mut cx), Poll::Ready(None));

        let cleared = Mailbox::new(4);
        assert_eq!(cleared.send(Arc::new(())), Ok(()));
        let held = Arc::new(());
        assert_eq!(cleared.send(held.clone()), Ok(()));
        cleared.close_and_clear();
        assert_eq!(Arc::strong_count(&held), 1, "unread messages dropped");
        assert!(matches!(cleared.poll_recv(&mut cx), Poll::Ready(None)));
    }
}
