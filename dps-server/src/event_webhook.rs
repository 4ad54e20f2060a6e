//! Delivery of registration events to an HTTPS webhook as CloudEvents 1.0 (structured mode,
//! `application/cloudevents+json`), signed like the allocation webhooks.
//!
//! Each server delivers the events it committed itself (so that replicas do not deliver one
//! event twice), from a bounded queue: when the webhook falls behind, the oldest events are
//! dropped first and counted (`dps_event_webhook_total{outcome="dropped"}`). A few deliveries
//! run at once; each is tried a few times with growing pauses, then counted as failed; it is
//! never retried forever. A shutdown waits for the queue (up to its grace period).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dps_outbound::{Method, Outbound, WebhookSigner, maybe_sign};
use dps_protocol::admin::Event;
use serde_json::json;
use tokio::sync::Notify;

use crate::observability::Metrics;
use crate::store::{Kind, Write};

/// Attempts per event.
const ATTEMPTS: u32 = 4;
/// Deliveries under way at once (so that one slow answer does not hold up the others; events
/// may therefore arrive out of order: their `id` and `time` say the order).
const DELIVERIES: usize = 4;
/// The pause after the first failed attempt; doubled after each.
const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// An event waiting for delivery.
#[derive(Debug)]
struct Outgoing {
    instance: String,
    event: Event,
}

/// The queue of one server's events for the webhook, and its delivery task's wake-up.
#[derive(Debug)]
pub struct EventWebhook {
    queue: Mutex<VecDeque<Outgoing>>,
    /// Deliveries under way (taken off the queue under its lock, so that an empty queue and
    /// none under way mean nothing is left).
    in_flight: AtomicUsize,
    capacity: usize,
    ready: Notify,
    metrics: Arc<Metrics>,
}

impl EventWebhook {
    /// A queue of at most `capacity` events, delivered to `url` by a task it starts.
    pub fn start(
        url: String,
        capacity: usize,
        outbound: Outbound,
        signer: Option<WebhookSigner>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let webhook = Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            in_flight: AtomicUsize::new(0),
            capacity: capacity.max(1),
            ready: Notify::new(),
            metrics,
        });
        for _ in 0..DELIVERIES {
            let (worker, url, outbound, signer) = (
                webhook.clone(),
                url.clone(),
                outbound.clone(),
                signer.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let next = worker.queue.lock().ok().and_then(|mut q| {
                        let next = q.pop_front();
                        if next.is_some() {
                            worker.in_flight.fetch_add(1, Ordering::SeqCst);
                        }
                        next
                    });
                    match next {
                        Some(outgoing) => {
                            worker
                                .deliver(&url, &outbound, signer.as_ref(), outgoing)
                                .await;
                            worker.in_flight.fetch_sub(1, Ordering::SeqCst);
                        }
                        None => worker.ready.notified().await,
                    }
                }
            });
        }
        webhook
    }

    /// Queues the events among `writes`, a transaction of instance `ns` that committed.
    pub fn committed(&self, writes: &[Write]) {
        for write in writes {
            let Write::Put {
                ns,
                kind: Kind::Event,
                doc,
                ..
            } = write
            else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<Event>(doc) else {
                continue;
            };
            let Ok(mut queue) = self.queue.lock() else {
                return;
            };
            if queue.len() >= self.capacity {
                queue.pop_front();
                self.metrics.event_webhook_dropped();
            }
            queue.push_back(Outgoing {
                instance: ns.clone(),
                event,
            });
            drop(queue);
            // One wake-up per event, kept when no delivery is waiting yet.
            self.ready.notify_one();
        }
    }

    /// Waits until every queued event has been delivered (or given up on), at most `within`;
    /// returns how many were still queued or under way then.
    pub async fn drain(&self, within: Duration) -> usize {
        let left = || {
            let queued = self.queue.lock().map_or(0, |q| q.len());
            queued + self.in_flight.load(Ordering::SeqCst)
        };
        let deadline = tokio::time::Instant::now() + within;
        while left() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        left()
    }

    /// Posts one event, trying again after a pause while the webhook fails.
    async fn deliver(
        &self,
        url: &str,
        outbound: &Outbound,
        signer: Option<&WebhookSigner>,
        outgoing: Outgoing,
    ) {
        let Ok(body) = serde_json::to_vec(&cloud_event(&outgoing)) else {
            return;
        };
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS {
            let sent = match outbound.request(Method::POST, url) {
                Ok(request) => {
                    let request = request
                        .header("content-type", "application/cloudevents+json")
                        .body(body.clone());
                    outbound.send(maybe_sign(signer, request, &body)).await
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok(answer) if answer.status.is_success() => {
                    self.metrics.event_webhook_delivered();
                    return;
                }
                // Refused for what it is: sending it again will not help.
                Ok(answer)
                    if answer.status.is_client_error()
                        && !matches!(answer.status.as_u16(), 408 | 429) =>
                {
                    tracing::warn!(status = %answer.status, "the event webhook refused an event for good");
                    break;
                }
                Ok(answer) => {
                    tracing::warn!(status = %answer.status, attempt, "the event webhook refused an event");
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "the event webhook could not be reached")
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
        self.metrics.event_webhook_failed();
    }
}

/// The CloudEvents 1.0 envelope of an event.
fn cloud_event(outgoing: &Outgoing) -> serde_json::Value {
    let event = &outgoing.event;
    json!({
        "specversion": "1.0",
        "id": event.id,
        "source": format!("/instances/{}", outgoing.instance),
        "type": format!("dps.{}", event.kind),
        "subject": event.registration_id,
        "time": event.time,
        "datacontenttype": "application/json",
        "data": event,
    })
}
