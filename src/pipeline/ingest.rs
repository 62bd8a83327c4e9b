//! The input side of the consume loop: messages librdkafka already holds are taken directly, up
//! to a burst, and each event's successor is taken and decoded while the event is applied (its
//! user's state loads into cache meanwhile). Behind [`Ingest::ready`] and [`Ingest::decode`] the
//! loop handles every message as if there were no look-ahead: rebalances first, then its checks.

use crate::config::{DecodeConfig, TopicsConfig};
use crate::decode::{Ahead, DecodeError, Decoder, ScratchPair};
use crate::engine::Engine;
use crate::event::{Event, Source};
use crate::kafka::SegContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};

/// A message as the consumer gave it.
pub(super) type Received<'c> = Result<BorrowedMessage<'c>, KafkaError>;

/// Messages taken from librdkafka's queue without a turn of the consume loop's `select!`.
const BURST: u32 = 256;

pub(super) struct Ingest<'c> {
    consumer: &'c StreamConsumer<SegContext>,
    topics: &'c TopicsConfig,
    decoder: Decoder,
    scratch: ScratchPair,
    /// The message after the current one, taken early, and what decoding it ahead gave.
    next: Option<(Received<'c>, Option<Ahead>)>,
    /// Messages taken in a row without a turn of the `select!`.
    burst: u32,
}

impl<'c> Ingest<'c> {
    pub(super) fn new(
        consumer: &'c StreamConsumer<SegContext>,
        topics: &'c TopicsConfig,
        decode: &DecodeConfig,
    ) -> Self {
        Self {
            consumer,
            topics,
            decoder: Decoder::new(decode.clone()),
            scratch: ScratchPair::default(),
            next: None,
            burst: 0,
        }
    }

    pub(super) fn consumer(&self) -> &'c StreamConsumer<SegContext> {
        self.consumer
    }

    /// The next message if it is already here (taken ahead, or held by librdkafka) and the
    /// burst allows; `None` means: give the `select!` a turn, then wait for the consumer.
    pub(super) fn ready(&mut self) -> Option<(Received<'c>, Option<Ahead>)> {
        let ready = match self.next.take() {
            Some(n) => Some(n),
            None if self.burst < BURST => ready_message(self.consumer).map(|m| (m, None)),
            None => None,
        };
        self.burst = if ready.is_some() { self.burst + 1 } else { 0 };
        ready
    }

    /// The input topic of `msg` (known already if it was decoded ahead).
    pub(super) fn source(
        &self,
        msg: &BorrowedMessage<'_>,
        ahead: Option<&Ahead>,
    ) -> Option<Source> {
        match ahead {
            Some(a) => Some(a.source()),
            None => self.topics.source_of(msg.topic()),
        }
    }

    /// The event of `msg` (from `source`), decoded now or taken from its decode ahead; takes
    /// and decodes the message after it meanwhile, within the burst.
    pub(super) fn decode(
        &mut self,
        msg: &BorrowedMessage<'_>,
        source: Source,
        ahead: Option<Ahead>,
        engine: &Engine,
        now: i64,
    ) -> Result<&Event, DecodeError> {
        let payload = msg.payload().unwrap_or_default();
        let (event, spare) =
            self.scratch
                .decode(&self.decoder, source, payload, Some(now), ahead)?;
        if self.burst < BURST {
            self.next = ready_message(self.consumer).map(|msg| {
                let event = msg.as_ref().ok().and_then(|m| {
                    let source = self.topics.source_of(m.topic())?;
                    Some((source, m.payload().unwrap_or_default()))
                });
                let ahead = event.map(|(source, payload)| {
                    engine.decode_ahead(spare, &self.decoder, source, payload, Some(now))
                });
                (msg, ahead)
            });
        }
        Ok(event)
    }

    /// Lets go of a message taken ahead but not processed (the loop stopped): it is in no
    /// marker and no stored offset, so it is read again after a restart.
    pub(super) fn stop(&mut self) {
        self.next = None;
    }
}

/// A message librdkafka already holds, if any, without waiting.
fn ready_message(consumer: &StreamConsumer<SegContext>) -> Option<Received<'_>> {
    poll_now(&mut std::pin::pin!(consumer.recv()))
}

/// The output of `future` if it is ready now, without waiting (a later `.await` of a pending
/// one registers the task's own waker).
pub(super) fn poll_now<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(future).poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}
