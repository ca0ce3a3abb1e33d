//! Publisher confirms: append results and early refusals resolve delivery
//! tags, resolved tags are held until every earlier tag of their channel is
//! resolved, then sent in order: runs of acks as one `multiple` basic.ack,
//! nacks one by one, a basic.return followed by the ack of its tag.

use std::sync::atomic::Ordering::Relaxed;

use amq_protocol::protocol::{basic, AMQPClass};
use tokio::io::{AsyncRead, AsyncWrite};

use super::publish::{Appended, Origin};
use super::Connection;
use crate::frame::{self, code};

/// A confirm's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Ack,
    Nack,
    /// basic.return (method, header and body frames, encoded), then an ack of
    /// this tag alone: clients pair a return with the next confirm they see.
    Returned(Vec<u8>),
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection<S> {
    pub(super) fn appended(&mut self, done: Appended) {
        let (mut acks, mut nacks) = (0, 0);
        let mut touched = Vec::new();
        for (origin, error) in done.results {
            let current = self
                .channels
                .get(&origin.channel)
                .is_some_and(|c| c.epoch == origin.epoch && !c.closing);
            if !current {
                // The channel closed meanwhile: its confirms went with it.
                continue;
            }
            match (origin.tag, error) {
                (None, None) => {}
                (None, Some(e)) => {
                    // No confirms to carry the refusal: close the channel, as
                    // RabbitMQ does when it cannot take a message.
                    self.close_channel(
                        origin.channel,
                        code::INTERNAL_ERROR,
                        format!("INTERNAL_ERROR - a message was not stored: {e}"),
                        None,
                    );
                }
                (Some(tag), error) => {
                    let outcome = if error.is_none() {
                        acks += 1;
                        Outcome::Ack
                    } else {
                        nacks += 1;
                        Outcome::Nack
                    };
                    self.hold(origin.channel, tag, outcome);
                    touched.push(origin.channel);
                }
            }
        }
        if acks > 0 {
            self.server.metrics.confirmed(done.started.elapsed(), acks);
        }
        self.server.metrics.acks.fetch_add(acks, Relaxed);
        self.server.metrics.nacks.fetch_add(nacks, Relaxed);
        touched.sort_unstable();
        touched.dedup();
        for ch in touched {
            self.send_confirms(ch);
        }
    }

    pub(super) fn resolve(&mut self, origin: Origin, outcome: Outcome) {
        let Some(tag) = origin.tag else {
            return;
        };
        let counter = match outcome {
            Outcome::Ack | Outcome::Returned(_) => &self.server.metrics.acks,
            Outcome::Nack => &self.server.metrics.nacks,
        };
        counter.fetch_add(1, Relaxed);
        self.hold(origin.channel, tag, outcome);
        self.send_confirms(origin.channel);
    }

    /// Keeps a resolved confirm until every earlier tag of its channel is sent.
    fn hold(&mut self, ch: u16, tag: u64, outcome: Outcome) {
        if let Some(c) = self.channels.get_mut(&ch) {
            if let Outcome::Returned(frames) = &outcome {
                self.held_bytes += frames.len() as u64;
            }
            match c.resolved.insert(tag, outcome) {
                None => self.held_confirms += 1,
                Some(Outcome::Returned(old)) => {
                    self.held_bytes = self.held_bytes.saturating_sub(old.len() as u64)
                }
                Some(_) => {}
            }
        }
    }

    /// Confirms the resolved tags that follow the last confirmed one: runs of
    /// acks as one `multiple` ack, nacks one by one.
    fn send_confirms(&mut self, ch: u16) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        let mut run: Option<(u64, u64)> = None; // (first, last) of a run of acks
        let mut out = Vec::new();
        while let Some(entry) = c.resolved.first_entry() {
            if *entry.key() != c.confirmed_through + 1 {
                break;
            }
            let (tag, outcome) = entry.remove_entry();
            c.confirmed_through = tag;
            self.held_confirms = self.held_confirms.saturating_sub(1);
            if let Outcome::Returned(frames) = &outcome {
                self.held_bytes = self.held_bytes.saturating_sub(frames.len() as u64);
            }
            if outcome == Outcome::Ack {
                run = Some(run.map_or((tag, tag), |(first, _)| (first, tag)));
                continue;
            }
            if let Some((first, last)) = run.take() {
                frame::method(ch, ack(first, last), &mut out);
            }
            match outcome {
                Outcome::Returned(frames) => {
                    out.extend_from_slice(&frames);
                    frame::method(ch, ack(tag, tag), &mut out);
                }
                _ => frame::method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: tag,
                        multiple: false,
                        requeue: false,
                    })),
                    &mut out,
                ),
            }
        }
        if let Some((first, last)) = run {
            frame::method(ch, ack(first, last), &mut out);
        }
        self.out.extend_from_slice(&out);
    }
}

fn ack(first: u64, last: u64) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag: last,
        multiple: last > first,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_runs_use_multiple() {
        assert_eq!(
            ack(3, 3),
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 3,
                multiple: false
            }))
        );
        assert_eq!(
            ack(3, 9),
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 9,
                multiple: true
            }))
        );
    }
}
