//! Engine events delivered to an async handler through an unbounded channel. When the handler
//! (or the client's connection) goes away, the receiver is dropped and the engine sees the sink
//! as closed, cancelling the sequence and freeing its memory.

use smelt_engine::scheduler::{Event, Sink};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub struct ChannelSink(UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, ev: Event) -> bool {
        self.0.send(ev).is_ok()
    }
    fn closed(&self) -> bool {
        self.0.is_closed()
    }
}

pub fn channel() -> (Box<dyn Sink>, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    (Box::new(ChannelSink(tx)), rx)
}
