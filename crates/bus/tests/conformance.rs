//! One suite, both backends: every case runs unchanged against the embedded streams and Redis.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod backends;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backends::Backend;
use caracal_bus::signature::StreamKey;
use caracal_bus::{
    BusError, Consumer, ConsumerConfig, Fields, Producer, ReplayNamespace, dead_letter_stream,
    stream_names,
};

conformance!(
    entries_arrive_in_order_with_their_fields,
    a_batch_appends_in_order,
    ranges_read_without_delivering_and_deletes_remove,
    every_group_sees_every_entry,
    consumers_of_one_group_share_the_entries,
    acknowledged_entries_leave_the_pending_list,
    idle_pending_entries_are_claimed_with_their_delivery_count,
    a_blocked_read_wakes_on_append_and_times_out_when_idle,
    reading_without_a_group_is_an_error,
    info_reports_length_lag_pending_and_oldest_age,
    trimming_keeps_what_any_group_still_needs,
    trimming_takes_every_consumed_entry_however_many,
    consumers_drop_unsigned_and_forged_messages_to_the_dead_letter_stream,
    entries_past_the_delivery_bound_are_dead_lettered,
    a_crashed_consumers_entries_are_processed_once_by_its_group,
    a_message_published_twice_is_handed_out_once,
    replay_keys_are_single_use_per_namespace,
    replay_keys_can_be_claimed_again_after_their_ttl,
    concurrent_claims_of_one_key_have_one_winner,
    concurrent_claims_of_many_keys_each_have_one_winner,
    rate_counts_rise_within_a_window_and_restart_in_the_next,
);

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn ids(entries: &[caracal_bus::Entry]) -> Vec<String> {
    entries.iter().map(|entry| entry.id.clone()).collect()
}

async fn append_numbered(backend: &Backend, stream: &str, count: usize) -> Vec<String> {
    let mut appended = Vec::new();
    for index in 0..count {
        appended.push(
            backend
                .streams
                .append(stream, &fields(&[("n", &index.to_string())]))
                .await
                .unwrap(),
        );
    }
    appended
}

async fn entries_arrive_in_order_with_their_fields(backend: &Backend) {
    let stream = backend.stream(stream_names::SESSIONS_REVOKE);
    let streams = &backend.streams;
    streams.ensure_group(&stream, "g").await.unwrap();
    streams.ensure_group(&stream, "g").await.unwrap();
    let odd = fields(&[("zone_id", "zone-1"), ("empty", ""), ("text", "a=b\nc ü ✓")]);
    let first = streams.append(&stream, &odd).await.unwrap();
    let rest = append_numbered(backend, &stream, 2).await;
    let read = streams
        .read_group(&stream, "g", "c1", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&read), [vec![first], rest].concat());
    assert_eq!(read[0].fields, odd);
    assert_eq!(read[2].fields, fields(&[("n", "1")]));
    assert!(read.iter().all(|entry| entry.deliveries == 1));
    assert!(
        streams
            .read_group(&stream, "g", "c1", 10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn every_group_sees_every_entry(backend: &Backend) {
    let stream = backend.stream(stream_names::SESSIONS_REVOKE);
    let streams = &backend.streams;
    streams.ensure_group(&stream, "replica-a").await.unwrap();
    streams.ensure_group(&stream, "replica-b").await.unwrap();
    let appended = append_numbered(backend, &stream, 3).await;
    for group in ["replica-a", "replica-b"] {
        let read = streams
            .read_group(&stream, group, "only", 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ids(&read), appended, "{group}");
    }
    // A group created later still starts from the beginning.
    streams.ensure_group(&stream, "replica-c").await.unwrap();
    let read = streams
        .read_group(&stream, "replica-c", "only", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&read), appended);
    // One created at the end sees only what comes after it, and keeps its place if created
    // again.
    streams
        .ensure_group_at_end(&stream, "replica-d")
        .await
        .unwrap();
    let later = append_numbered(backend, &stream, 2).await;
    streams
        .ensure_group_at_end(&stream, "replica-d")
        .await
        .unwrap();
    let read = streams
        .read_group(&stream, "replica-d", "only", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&read), later);
}

async fn consumers_of_one_group_share_the_entries(backend: &Backend) {
    let stream = backend.stream(stream_names::AUDIT_EVENTS);
    let streams = &backend.streams;
    streams.ensure_group(&stream, "ingest").await.unwrap();
    let appended = append_numbered(backend, &stream, 5).await;
    let first = streams
        .read_group(&stream, "ingest", "c1", 2, Duration::ZERO)
        .await
        .unwrap();
    let second = streams
        .read_group(&stream, "ingest", "c2", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!([ids(&first), ids(&second)].concat(), appended);
}

async fn acknowledged_entries_leave_the_pending_list(backend: &Backend) {
    let stream = backend.stream(stream_names::AUDIT_EVENTS);
    let streams = &backend.streams;
    streams.ensure_group(&stream, "ingest").await.unwrap();
    let appended = append_numbered(backend, &stream, 3).await;
    streams
        .read_group(&stream, "ingest", "c1", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        streams
            .ack(&stream, "ingest", &appended[..1])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        streams
            .ack(&stream, "ingest", &appended[..1])
            .await
            .unwrap(),
        0,
        "acking twice counts once"
    );
    assert_eq!(streams.ack(&stream, "ingest", &[]).await.unwrap(), 0);
    let pending = streams.pending(&stream, "ingest", 10).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|entry| entry.id.clone())
            .collect::<Vec<_>>(),
        appended[1..]
    );
    assert!(
        pending
            .iter()
            .all(|entry| entry.consumer == "c1" && entry.deliveries == 1)
    );
}

async fn idle_pending_entries_are_claimed_with_their_delivery_count(backend: &Backend) {
    let stream = backend.stream(stream_names::SESSIONS_REVOKE);
    let streams = &backend.streams;
    streams.ensure_group(&stream, "g").await.unwrap();
    let appended = append_numbered(backend, &stream, 2).await;
    streams
        .read_group(&stream, "g", "crashed", 10, Duration::ZERO)
        .await
        .unwrap();
    let too_fresh = streams
        .claim_idle(&stream, "g", "rescuer", Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert!(too_fresh.is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let claimed = streams
        .claim_idle(&stream, "g", "rescuer", Duration::from_millis(10), 10)
        .await
        .unwrap();
    assert_eq!(ids(&claimed), appended);
    assert!(
        claimed.iter().all(|entry| entry.deliveries == 2),
        "{claimed:?}"
    );
    assert_eq!(claimed[0].fields, fields(&[("n", "0")]));
    let pending = streams.pending(&stream, "g", 10).await.unwrap();
    assert!(
        pending
            .iter()
            .all(|entry| entry.consumer == "rescuer" && entry.deliveries == 2)
    );
}

async fn a_blocked_read_wakes_on_append_and_times_out_when_idle(backend: &Backend) {
    let stream = backend.stream(stream_names::SESSIONS_REVOKE);
    let streams = Arc::clone(&backend.streams);
    streams.ensure_group(&stream, "g").await.unwrap();

    let started = Instant::now();
    let idle = streams
        .read_group(&stream, "g", "c", 10, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(idle.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );

    let reader = {
        let (streams, stream) = (Arc::clone(&streams), stream.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let entries = streams
                .read_group(&stream, "g", "c", 10, Duration::from_secs(10))
                .await
                .unwrap();
            (entries, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let id = streams
        .append(&stream, &fields(&[("wake", "up")]))
        .await
        .unwrap();
    let (entries, waited) = reader.await.unwrap();
    assert_eq!(ids(&entries), [id]);
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
}

async fn reading_without_a_group_is_an_error(backend: &Backend) {
    let stream = backend.stream(stream_names::KEYS_INVALIDATE);
    backend
        .streams
        .append(&stream, &fields(&[("a", "b")]))
        .await
        .unwrap();
    let error = backend
        .streams
        .read_group(&stream, "missing", "c", 1, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(error, BusError::NoGroup { .. }), "{error}");
}

async fn info_reports_length_lag_pending_and_oldest_age(backend: &Backend) {
    let stream = backend.stream(stream_names::POLICY_INVALIDATE);
    let streams = &backend.streams;
    let empty = streams.info(&stream).await.unwrap();
    assert_eq!((empty.length, empty.groups.len()), (0, 0));
    streams.ensure_group(&stream, "g").await.unwrap();
    append_numbered(backend, &stream, 5).await;
    streams.ensure_group(&stream, "h").await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    streams
        .read_group(&stream, "g", "c", 2, Duration::ZERO)
        .await
        .unwrap();
    let info = streams.info(&stream).await.unwrap();
    assert_eq!(info.length, 5);
    let names: Vec<&str> = info
        .groups
        .iter()
        .map(|group| group.name.as_str())
        .collect();
    assert_eq!(names, ["g", "h"]);
    let (g, h) = (&info.groups[0], &info.groups[1]);
    assert_eq!((g.pending, g.lag), (2, 3));
    assert!(
        g.oldest_pending_age.unwrap() >= Duration::from_millis(20),
        "{g:?}"
    );
    assert_eq!((h.pending, h.lag, h.oldest_pending_age), (0, 5, None));
}

async fn trimming_takes_every_consumed_entry_however_many(backend: &Backend) {
    let stream = backend.stream(stream_names::AUDIT_EVENTS);
    let streams = &backend.streams;
    streams.ensure_group(&stream, "g").await.unwrap();
    // More than one trimming write takes (the embedded store trims in chunks of 2,000).
    let batch: Vec<Fields> = (0..4_500)
        .map(|n| fields(&[("n", &n.to_string())]))
        .collect();
    let appended = streams.append_many(&stream, &batch).await.unwrap();
    let read = streams
        .read_group(&stream, "g", "c", 5_000, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(read.len(), 4_500);
    streams.ack(&stream, "g", &appended[..4_400]).await.unwrap();
    assert_eq!(streams.trim_consumed(&stream).await.unwrap(), 4_400);
    let info = streams.info(&stream).await.unwrap();
    assert_eq!(info.length, 100);
    assert_eq!(info.groups[0].pending, 100);
}

async fn trimming_keeps_what_any_group_still_needs(backend: &Backend) {
    let stream = backend.stream(stream_names::DELEGATIONS_INVALIDATE);
    let streams = &backend.streams;
    let appended = append_numbered(backend, &stream, 4).await;
    assert_eq!(
        streams.trim_consumed(&stream).await.unwrap(),
        0,
        "no group: keep everything"
    );
    streams.ensure_group(&stream, "g").await.unwrap();
    streams.ensure_group(&stream, "h").await.unwrap();
    streams
        .read_group(&stream, "g", "c", 4, Duration::ZERO)
        .await
        .unwrap();
    streams.ack(&stream, "g", &appended[..3]).await.unwrap();
    streams
        .read_group(&stream, "h", "c", 2, Duration::ZERO)
        .await
        .unwrap();
    streams.ack(&stream, "h", &appended[1..2]).await.unwrap();
    // h still has entry 0 pending: nothing may go.
    assert_eq!(streams.trim_consumed(&stream).await.unwrap(), 0);
    streams.ack(&stream, "h", &appended[..1]).await.unwrap();
    // Both groups are done with 0 and 1; h has not read 2, g has not acked 3.
    assert_eq!(streams.trim_consumed(&stream).await.unwrap(), 2);
    assert_eq!(streams.info(&stream).await.unwrap().length, 2);
    let rest = streams
        .read_group(&stream, "h", "c", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&rest), appended[2..]);
}

fn consumer_config(stream: &str) -> ConsumerConfig {
    ConsumerConfig {
        stream: stream.to_owned(),
        group: "gateway-1".to_owned(),
        consumer: "gateway-1".to_owned(),
        batch: 10,
        block: Duration::from_millis(50),
        reclaim_idle: Duration::from_secs(60),
        max_deliveries: 3,
        dedupe_window: 1000,
    }
}

async fn consumers_drop_unsigned_and_forged_messages_to_the_dead_letter_stream(backend: &Backend) {
    let stream = backend.stream(stream_names::SESSIONS_REVOKE);
    let key = StreamKey::new(b"deployment stream key");
    let consumer = Consumer::start(
        Arc::clone(&backend.streams),
        key.clone(),
        consumer_config(&stream),
    )
    .await
    .unwrap();
    let producer = Producer::new(Arc::clone(&backend.streams), key);
    let forger = Producer::new(Arc::clone(&backend.streams), StreamKey::new(b"attacker"));

    let good = producer
        .publish(
            &stream,
            fields(&[
                ("zone_id", "z1"),
                ("agent_session_id", "s1"),
                ("_sig", "stale"),
            ]),
        )
        .await
        .unwrap();
    let unsigned = backend
        .streams
        .append(&stream, &fields(&[("zone_id", "z1")]))
        .await
        .unwrap();
    let forged = forger
        .publish(&stream, fields(&[("zone_id", "z1")]))
        .await
        .unwrap();

    let delivered = consumer.poll().await.unwrap();
    assert_eq!(ids(&delivered), [good]);
    assert_eq!(consumer.ack(&ids(&delivered)).await.unwrap(), 1);
    let stats = consumer.stats();
    assert_eq!(stats.bad_signatures.load(Ordering::Relaxed), 2);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 2);

    let dead = dead_letter_stream(&stream);
    backend
        .streams
        .ensure_group(&dead, "inspect")
        .await
        .unwrap();
    let letters = backend
        .streams
        .read_group(&dead, "inspect", "i", 10, Duration::ZERO)
        .await
        .unwrap();
    let summary: Vec<(String, String)> = letters
        .iter()
        .map(|letter| {
            (
                letter.fields["source_id"].clone(),
                letter.fields["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (unsigned, "missing_signature".to_owned()),
            (forged, "bad_signature".to_owned())
        ]
    );
    assert_eq!(letters[0].fields["payload"], r#"{"zone_id":"z1"}"#);
    assert!(
        backend
            .streams
            .pending(&stream, "gateway-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn entries_past_the_delivery_bound_are_dead_lettered(backend: &Backend) {
    let stream = backend.stream(stream_names::AUDIT_EVENTS);
    let key = StreamKey::new(b"k");
    let config = ConsumerConfig {
        reclaim_idle: Duration::ZERO,
        max_deliveries: 2,
        block: Duration::ZERO,
        ..consumer_config(&stream)
    };
    let consumer = Consumer::start(Arc::clone(&backend.streams), key.clone(), config)
        .await
        .unwrap();
    let producer = Producer::new(Arc::clone(&backend.streams), key);
    let message = fields(&[("id", "event-1"), ("dedupe_key", "event-1")]);
    let id = producer.publish(&stream, message.clone()).await.unwrap();
    // A handler that keeps failing never acknowledges.
    let deliveries: Vec<u64> = {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let batch = consumer.poll().await.unwrap();
            assert_eq!(ids(&batch), std::slice::from_ref(&id));
            seen.push(batch[0].deliveries);
        }
        seen
    };
    assert_eq!(deliveries, [1, 2]);
    assert!(
        consumer.poll().await.unwrap().is_empty(),
        "third delivery exceeds the bound"
    );
    assert_eq!(consumer.stats().dead_lettered.load(Ordering::Relaxed), 1);
    assert!(
        backend
            .streams
            .pending(&stream, "gateway-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
    let dead = backend
        .streams
        .info(&dead_letter_stream(&stream))
        .await
        .unwrap();
    assert_eq!(dead.length, 1);
    // Dead-lettered is not handled: the same message replayed is delivered, not deduplicated.
    let replayed = producer.publish(&stream, message).await.unwrap();
    let batch = consumer.poll().await.unwrap();
    assert_eq!(ids(&batch), [replayed]);
}

async fn a_crashed_consumers_entries_are_processed_once_by_its_group(backend: &Backend) {
    let stream = backend.stream(stream_names::SESSIONS_REVOKE);
    let key = StreamKey::new(b"k");
    let producer = Producer::new(Arc::clone(&backend.streams), key.clone());
    let config = |name: &str| ConsumerConfig {
        consumer: name.to_owned(),
        reclaim_idle: Duration::from_millis(100),
        ..consumer_config(&stream)
    };
    let crashed = Consumer::start(Arc::clone(&backend.streams), key.clone(), config("a"))
        .await
        .unwrap();
    let survivor = Consumer::start(Arc::clone(&backend.streams), key, config("b"))
        .await
        .unwrap();
    let mut published = Vec::new();
    for index in 0..6 {
        published.push(
            producer
                .publish(&stream, fields(&[("n", &index.to_string())]))
                .await
                .unwrap(),
        );
    }
    // `a` takes a batch and dies before acknowledging it.
    let lost = crashed.poll().await.unwrap();
    assert_eq!(lost.len(), 6);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut processed = Vec::new();
    for _ in 0..3 {
        let batch = survivor.poll().await.unwrap();
        survivor.ack(&ids(&batch)).await.unwrap();
        processed.extend(ids(&batch));
    }
    assert_eq!(processed, published, "every entry once, none twice");
    assert!(
        backend
            .streams
            .pending(&stream, "gateway-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn replay_keys_are_single_use_per_namespace(backend: &Backend) {
    let key = backend.stream("jti-1");
    let ttl = Duration::from_secs(60);
    let replay = &backend.replay;
    assert!(
        replay
            .claim_once(ReplayNamespace::Jti, &key, ttl)
            .await
            .unwrap()
    );
    assert!(
        !replay
            .claim_once(ReplayNamespace::Jti, &key, ttl)
            .await
            .unwrap()
    );
    assert!(
        !replay
            .claim_once(ReplayNamespace::Jti, &key, ttl)
            .await
            .unwrap()
    );
    assert!(
        replay
            .claim_once(ReplayNamespace::GatewayNonce, &key, ttl)
            .await
            .unwrap()
    );
    assert!(
        replay
            .claim_once(ReplayNamespace::Jti, &backend.stream("jti-2"), ttl)
            .await
            .unwrap()
    );
    // The Gateway's register (in memory when embedded) answers the same way.
    for expected in [true, false, false] {
        assert_eq!(
            replay
                .claim_once(ReplayNamespace::GatewayJti, &key, ttl)
                .await
                .unwrap(),
            expected
        );
    }
}

async fn replay_keys_can_be_claimed_again_after_their_ttl(backend: &Backend) {
    let key = backend.stream("nonce");
    let replay = &backend.replay;
    let ttl = Duration::from_millis(100);
    assert!(
        replay
            .claim_once(ReplayNamespace::GatewayNonce, &key, ttl)
            .await
            .unwrap()
    );
    assert!(
        !replay
            .claim_once(ReplayNamespace::GatewayNonce, &key, ttl)
            .await
            .unwrap()
    );
    assert!(
        replay
            .claim_once(ReplayNamespace::GatewayJti, &key, ttl)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    for namespace in [ReplayNamespace::GatewayNonce, ReplayNamespace::GatewayJti] {
        assert!(replay.claim_once(namespace, &key, ttl).await.unwrap());
        assert!(!replay.claim_once(namespace, &key, ttl).await.unwrap());
    }
}

/// Many keys claimed at once (the embedded registry commits them in shared transactions):
/// every key has exactly one winner, and no claim is lost or answered for another key.
async fn concurrent_claims_of_many_keys_each_have_one_winner(backend: &Backend) {
    let attempts: Vec<_> = (0..64)
        .map(|n| {
            let (replay, key) = (
                Arc::clone(&backend.replay),
                backend.stream(&format!("k{}", n % 32)),
            );
            tokio::spawn(async move {
                let won = replay
                    .claim_once(ReplayNamespace::GatewayJti, &key, Duration::from_secs(60))
                    .await
                    .unwrap();
                (key, won)
            })
        })
        .collect();
    let mut winners = std::collections::BTreeMap::new();
    for attempt in attempts {
        let (key, won) = attempt.await.unwrap();
        *winners.entry(key).or_insert(0) += u32::from(won);
    }
    assert_eq!(winners.len(), 32);
    assert!(winners.values().all(|won| *won == 1), "{winners:?}");
}

async fn concurrent_claims_of_one_key_have_one_winner(backend: &Backend) {
    let key = backend.stream("raced");
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let (replay, key) = (Arc::clone(&backend.replay), key.clone());
            tokio::spawn(async move {
                replay
                    .claim_once(ReplayNamespace::Jti, &key, Duration::from_secs(60))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for attempt in attempts {
        winners += u32::from(attempt.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn rate_counts_rise_within_a_window_and_restart_in_the_next(backend: &Backend) {
    let rates = &backend.rates;
    let hour = Duration::from_secs(3600);
    let bucket = backend.stream("ip:127.0.0.1");
    let counts = [
        rates.hit(&bucket, hour).await.unwrap(),
        rates.hit(&bucket, hour).await.unwrap(),
        rates.hit(&bucket, hour).await.unwrap(),
    ];
    assert_eq!(counts, [1, 2, 3]);
    assert_eq!(
        rates
            .hit(&backend.stream("ip:10.0.0.1"), hour)
            .await
            .unwrap(),
        1
    );

    let short = Duration::from_millis(100);
    let quick = backend.stream("quick");
    rates.hit(&quick, short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        rates.hit(&quick, short).await.unwrap(),
        1,
        "a new window starts from zero"
    );
}

async fn a_message_published_twice_is_handed_out_once(backend: &Backend) {
    let stream = backend.stream(stream_names::SESSIONS_REVOKE);
    let key = StreamKey::new(b"k");
    let consumer = Consumer::start(
        Arc::clone(&backend.streams),
        key.clone(),
        consumer_config(&stream),
    )
    .await
    .unwrap();
    let producer = Producer::new(Arc::clone(&backend.streams), key);
    let message = fields(&[
        ("zone_id", "z1"),
        ("outbox_id", "41"),
        ("dedupe_key", "revoke:s1"),
    ]);
    producer.publish(&stream, message.clone()).await.unwrap();
    let first = consumer.poll().await.unwrap();
    consumer.ack(&ids(&first)).await.unwrap();
    producer.publish(&stream, message).await.unwrap();
    producer
        .publish(&stream, fields(&[("zone_id", "z1"), ("outbox_id", "42")]))
        .await
        .unwrap();
    let second = consumer.poll().await.unwrap();
    let outbox_ids: Vec<&str> = first
        .iter()
        .chain(&second)
        .map(|entry| entry.fields["outbox_id"].as_str())
        .collect();
    assert_eq!(outbox_ids, ["41", "42"]);
    assert_eq!(consumer.stats().duplicates.load(Ordering::Relaxed), 1);
    consumer.ack(&ids(&second)).await.unwrap();
    assert!(
        backend
            .streams
            .pending(&stream, "gateway-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_batch_appends_in_order(backend: &Backend) {
    let stream = backend.stream(stream_names::AUDIT_EVENTS);
    let streams = &backend.streams;
    streams.ensure_group(&stream, "g").await.unwrap();
    let first = streams
        .append(&stream, &fields(&[("n", "first")]))
        .await
        .unwrap();
    let batch: Vec<Fields> = (0..50).map(|n| fields(&[("n", &n.to_string())])).collect();
    let appended = streams.append_many(&stream, &batch).await.unwrap();
    assert_eq!(appended.len(), 50);
    assert!(streams.append_many(&stream, &[]).await.unwrap().is_empty());
    let read = streams
        .read_group(&stream, "g", "c", 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&read), [vec![first], appended].concat());
    let numbers: Vec<&str> = read
        .iter()
        .skip(1)
        .map(|entry| entry.fields["n"].as_str())
        .collect();
    let expected: Vec<String> = (0..50).map(|n| n.to_string()).collect();
    assert_eq!(numbers, expected);
}

async fn ranges_read_without_delivering_and_deletes_remove(backend: &Backend) {
    let stream = backend.stream("caracal.audit.events.dead");
    let streams = &backend.streams;
    let appended = append_numbered(backend, &stream, 5).await;
    let all = streams.range(&stream, None, 10).await.unwrap();
    assert_eq!(ids(&all), appended);
    assert!(all.iter().all(|entry| entry.deliveries == 0));
    assert_eq!(
        ids(&streams.range(&stream, Some(&appended[1]), 2).await.unwrap()),
        appended[2..4]
    );
    // A malformed cursor is the caller's error on every backend, not a backend failure.
    for bad in ["garbage", "12", "-3", "1-", "a-1", "1-b", "+1-2", "1-2-3"] {
        assert!(
            matches!(
                streams.range(&stream, Some(bad), 2).await,
                Err(BusError::InvalidEntryId(_))
            ),
            "`{bad}` was accepted as an entry id"
        );
    }
    streams.ensure_group(&stream, "g").await.unwrap();
    assert_eq!(
        streams
            .read_group(&stream, "g", "c", 10, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        5,
        "range delivered nothing"
    );
    assert_eq!(streams.delete(&stream, &appended[..2]).await.unwrap(), 2);
    assert_eq!(streams.delete(&stream, &appended[..1]).await.unwrap(), 0);
    assert_eq!(
        ids(&streams.range(&stream, None, 10).await.unwrap()),
        appended[2..]
    );
}
