//! The publish API from a test ([`publish`], [`publish_ok`], [`pub_event`]) and
//! Prometheus text parsing.

#![allow(dead_code)] // each test module uses its own subset

use super::*;

/// `POST /api/events` with an optional bearer key and a raw body.
pub fn publish_raw(addr: SocketAddr, key: Option<&str>, body: &[u8]) -> HttpResponse {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let mut req = format!(
        "POST /api/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    http_request(addr, &req)
}

/// Publish `events` (an object or an array) with [`PUBLISH_KEY`].
pub fn publish(addr: SocketAddr, events: &Value) -> HttpResponse {
    publish_raw(addr, Some(PUBLISH_KEY), events.to_string().as_bytes())
}

/// Publish and require 202 `{"accepted": n}` for `n` events.
pub fn publish_ok(addr: SocketAddr, events: &Value) {
    let n = events.as_array().map_or(1, Vec::len);
    let r = publish(addr, events);
    assert_eq!(r.status, 202, "publish answered {} {}", r.status, r.text());
    assert_eq!(r.json(), json!({ "accepted": n, "cancelled": [] }));
}

/// One publishable event.
pub fn pub_event(kind: &str, user: &str, thread: Option<&str>, run: &str, data: Value) -> Value {
    json!({"type": kind, "user_id": user, "thread_id": thread, "run_id": run, "agent_name": "pub_agent", "data": data})
}

/// Parse Prometheus text into `name{labels}` -> value.
pub fn prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("metric line {l:?}"));
            (
                name.to_owned(),
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("metric value in {l:?}")),
            )
        })
        .collect()
}

/// The value of one sample (exact `name{labels}`), panicking when absent.
pub fn metric(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// Sum of every sample of a metric family (`name` and `name{...}`).
pub fn metric_sum(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, _)| n == name || n.starts_with(&format!("{name}{{")))
        .map(|(_, v)| *v)
        .sum()
}

/// Poll `f` every 10 ms until it returns true, panicking after [`WAIT`].
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
