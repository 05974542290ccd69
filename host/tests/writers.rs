//! Parallel writers at the sink: two connections, one commit order, and
//! the deadlock PostgreSQL cannot see (a later batch holding a row an
//! earlier one inserts, while it waits for that one's commit).

mod common;

use std::time::Duration;

use common::*;
use host::sink::order::Order;
use host::sink::{Commit, Sink};
use host::stage::Event;

fn event(id: &str) -> Event {
    Event {
        event_id: id.to_owned(),
        user_id: 1,
        event_type: "view".into(),
        product_id: 1,
        price_cents: 100,
        event_time: 820_000_000_000_000,
    }
}

fn batch(ids: &[&str]) -> Commit {
    Commit {
        id: uuid::Uuid::new_v4(),
        rows_in: ids.len(),
        events: ids.iter().map(|id| event(id)).collect(),
        ..Commit::default()
    }
}

#[test]
fn a_later_batch_blocking_an_earlier_one_gives_way_and_both_commit_in_order() {
    let url = fresh_db("writers_give_way");
    let shared = uuid::Uuid::new_v4().to_string();
    let (a_only, b_only) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let patience = Duration::from_secs(30);
        let mut first = Sink::connect(&url, patience).await.unwrap();
        let mut second = first.secondary(patience).await.unwrap();
        let a = batch(&[&shared, &a_only]);
        let b = batch(&[&shared, &b_only]);
        let mut order = Order::default();
        let (mut turn_a, mut turn_b) = (order.next_turn(), order.next_turn());

        // B, the later batch, goes first: its rows go in, then its commit
        // waits for A's.
        let b_commit = tokio::spawn(async move {
            let done = second.commit(&b, &mut turn_b).await;
            turn_b.pass();
            done
        });
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let started = std::time::Instant::now();
        loop {
            let waiting: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "B's transaction never waited for its turn"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A inserts the row B holds: its COPY waits for B's transaction,
        // which waits for A. B must see it and give way.
        let done_a = first.commit(&a, &mut turn_a).await.unwrap();
        turn_a.pass();
        let done_b = tokio::time::timeout(PATIENCE, b_commit)
            .await
            .expect("B committed after A")
            .unwrap()
            .unwrap();
        assert_eq!((done_a.written, done_a.conflicting), (2, 0));
        assert_eq!(
            (done_b.written, done_b.conflicting),
            (1, 1),
            "B wrote its own row again, and found A's"
        );
        assert!(
            done_a.batch_id < done_b.batch_id,
            "committed in batch order"
        );
    });
    let ids = query(
        &url,
        "SELECT event_id::text FROM ecommerce_events ORDER BY 1",
    );
    let mut want = vec![shared, a_only, b_only];
    want.sort();
    let got: Vec<String> = ids.into_iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(got, want);
}

#[test]
fn a_batch_after_one_that_failed_for_good_is_not_committed() {
    let url = fresh_db("writers_abort");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let patience = Duration::from_secs(30);
        let first = Sink::connect(&url, patience).await.unwrap();
        let mut second = first.secondary(patience).await.unwrap();
        let mut order = Order::default();
        let (turn_a, mut turn_b) = (order.next_turn(), order.next_turn());
        let b = batch(&[&uuid::Uuid::new_v4().to_string()]);
        let b_commit = tokio::spawn(async move { second.commit(&b, &mut turn_b).await });
        // A fails for good: its turn is dropped without passing.
        drop(turn_a);
        let result = tokio::time::timeout(PATIENCE, b_commit)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(result, Err(host::sink::SinkError::Aborted)),
            "{result:?}"
        );
        drop(first);
    });
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 0);
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.batches"), 0);
}
