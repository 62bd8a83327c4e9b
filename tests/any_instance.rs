//! Any instance answers for any user. Two instances split the partitions; `GET /users/{id}` from
//! either answers for the users of both (the other's by asking it), `DELETE` from the instance
//! that does not hold the user erases it, a user nobody holds is 404, and while the instance
//! holding a user is gone and its partitions have not moved yet, the answer is 503 with
//! `Retry-After`, not a wrong 404.

mod common;

use common::*;
use segstream::event::ChangeReason;
use std::collections::HashMap;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(120);
const TOKEN: &str = "t0ken";

fn profile(port: u16, user: &str) -> Option<(u16, HashMap<String, String>, String)> {
    http_call(port, "GET", &format!("/users/{user}"), Some(TOKEN))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_instance_answers_for_every_user_and_erases_for_the_other() {
    const PARTITIONS: i32 = 4;
    let settings = fresh_settings("any", PARTITIONS).await;
    let sent = produce_generated(&settings, 9, 60, 1_200).await;
    let per_user = events_per_user(&sent);
    let (port_a, port_b) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(
        &settings,
        dir.path(),
        &format!(
            "[http]\ntoken = \"{TOKEN}\"\npeers = [\"127.0.0.1:{port_a}\", \"127.0.0.1:{port_b}\"]\n"
        ),
    );
    let mut a = spawn_service_on(&config, port_a);
    let mut b = spawn_service_on(&config, port_b);
    let ends = end_offsets(&sent);
    let settled = wait_until(PATIENCE, || {
        let split = [port_a, port_b]
            .iter()
            .all(|p| scrape(*p, "segstream_users_tracked").is_some_and(|u| u > 0.0));
        let ready = [port_a, port_b]
            .iter()
            .all(|p| http_status(*p, "/readyz") == Some(200));
        let c = committed(&settings, PARTITIONS);
        split && ready && ends.iter().all(|(k, end)| c.get(k) == Some(end))
    })
    .await;
    assert!(
        settled,
        "both instances hold partitions and consumed everything"
    );

    // Every user from either instance, with the same profile; some through the other one.
    let (mut forwarded_by_a, mut forwarded_by_b) = (Vec::new(), 0);
    for (user, events) in &per_user {
        let from_a = profile(port_a, user).unwrap();
        let from_b = profile(port_b, user).unwrap();
        assert_eq!(
            (from_a.0, from_b.0),
            (200, 200),
            "{user}: {from_a:?} {from_b:?}"
        );
        let (pa, pb): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&from_a.2).unwrap(),
            serde_json::from_str(&from_b.2).unwrap(),
        );
        assert_eq!(pa["events"].as_u64(), Some(*events), "{user}");
        assert_eq!(pa, pb, "{user}: one profile whichever instance is asked");
        if from_a.1.contains_key("x-segstream-served-by") {
            forwarded_by_a.push(user.clone());
        }
        if from_b.1.contains_key("x-segstream-served-by") {
            forwarded_by_b += 1;
        }
    }
    assert!(
        !forwarded_by_a.is_empty() && forwarded_by_b > 0,
        "each instance answered some users through the other ({} and {forwarded_by_b})",
        forwarded_by_a.len()
    );
    assert_eq!(profile(port_a, "nobody").unwrap().0, 404);
    assert_eq!(profile(port_b, "nobody").unwrap().0, 404);
    // Without the token a forwarded request is refused like any other.
    assert_eq!(
        http_call(
            port_a,
            "GET",
            &format!("/users/{}", forwarded_by_a[0]),
            None
        )
        .unwrap()
        .0,
        401
    );

    // DELETE at A of a user B holds: erased there, gone from both, an `erased` change published.
    let erased = &forwarded_by_a[0];
    let deleted = http_call(port_a, "DELETE", &format!("/users/{erased}"), Some(TOKEN)).unwrap();
    assert_eq!(deleted.0, 204, "{deleted:?}");
    assert_eq!(profile(port_a, erased).unwrap().0, 404);
    assert_eq!(profile(port_b, erased).unwrap().0, 404);
    let changes = read_topic(
        &settings,
        &settings.kafka.topics.segment_changes,
        usize::MAX,
        Duration::from_secs(10),
    );
    let erasures: Vec<_> = changes
        .iter()
        .map(|c| segstream::encode::decode_change(&c.payload, settings.output.format).unwrap())
        .filter(|c| c.reason == ChangeReason::Erased)
        .collect();
    assert_eq!(erasures.len(), 1);
    assert_eq!(erasures[0].user_id.as_str(), erased.as_str());

    // B is killed: its users are in partitions nobody holds until the group moves them to A.
    // Meanwhile A answers 503 with Retry-After for them, then 200 once it has restored them.
    let held_by_b = forwarded_by_a[1..].to_vec();
    b.kill().unwrap();
    b.wait().unwrap();
    let during = profile(port_a, &held_by_b[0]).unwrap();
    assert_eq!(during.0, 503, "{during:?}");
    assert!(during.1.contains_key("retry-after"), "{during:?}");
    let taken_over = wait_until(PATIENCE, || {
        held_by_b
            .iter()
            .all(|u| profile(port_a, u).is_some_and(|r| r.0 == 200))
    })
    .await;
    assert!(taken_over, "A answers for B's users after taking over");
    terminate(&mut a);
}
