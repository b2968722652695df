//! Issue 13, item 2: `admin_listen`. With it set, `/metrics`, `/ws/stats` and
//! `/ws/config` answer 404 on the client port and 200 on the admin port; the admin port
//! serves those and `/health` only (no upgrades, no publish API). Without it (the
//! default) everything stays on `listen`. The rule is `Route::on_port`
//! (`src/http/routes.rs`).

use std::net::SocketAddr;

use serde_json::json;

use crate::support::*;

fn admin_config() -> agentwire::Config {
    agentwire::Config {
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..config()
    }
}

#[test]
fn the_admin_endpoints_move_to_the_admin_port() {
    let gateway = agentwire::Gateway::new(admin_config()).expect("binds both listeners");
    let addr = gateway.local_addr();
    let admin = gateway.admin_addr().expect("admin listener bound");
    assert_ne!(addr, admin);
    let handle = gateway.spawn().expect("reactor thread");

    for path in ["/metrics", "/ws/stats", "/ws/config"] {
        assert_refusal(&get(addr, path), 404, "not_found");
        assert_eq!(get(admin, path).status, 200, "{path} on the admin port");
    }
    // /health is on both.
    assert_eq!(get_json(addr, "/health").1["status"], "healthy");
    assert_eq!(get_json(admin, "/health").1["status"], "healthy");
    // The admin port serves nothing else: no upgrade, no publish API, no unknown path.
    assert_refusal(
        &upgrade(admin, "/ws", &[bearer(&token("adm-user"))]),
        404,
        "not_found",
    );
    let r = publish_raw(admin, Some(PUBLISH_KEY), b"{}");
    assert_refusal(&r, 404, "not_found");
    assert_refusal(&get(admin, "/nope"), 404, "not_found");
    // The client port still serves clients and the publish API.
    let mut c = connect(addr, "adm-user");
    publish_ok(
        addr,
        &pub_event(
            "agent_thinking",
            "adm-user",
            None,
            "r-adm",
            json!({"step": 1}),
        ),
    );
    assert_eq!(c.expect_type("agent_thinking")["run_id"], "r-adm");
    // The figures on the admin port are the gateway's: the session is counted there.
    let (status, stats) = get_json(admin, "/ws/stats");
    assert_eq!(status, 200);
    assert_eq!(stats["connections"]["open"], json!(1));
    let metrics = get(admin, "/metrics").text();
    assert!(metrics.contains("agentwire_"), "{metrics}");
    let (_, cfg) = get_json(admin, "/ws/config");
    // The configured address, as written (port 0: the kernel chose it).
    assert_eq!(cfg["admin_listen"], json!("127.0.0.1:0"));
    c.close();
    let _ = handle.shutdown();
}

#[test]
fn without_admin_listen_everything_stays_on_listen() {
    let gw = TestGateway::plain();
    for path in ["/metrics", "/ws/stats", "/ws/config", "/health"] {
        assert_eq!(get(gw.addr, path).status, 200, "{path}");
    }
    assert_eq!(
        get_json(gw.addr, "/ws/config").1["admin_listen"],
        json!(null)
    );
}

#[test]
fn admin_listen_equal_to_listen_is_refused_at_start() {
    let cfg = agentwire::Config {
        listen: "127.0.0.1:18089".parse().expect("addr"),
        admin_listen: Some("127.0.0.1:18089".parse().expect("addr")),
        ..config()
    };
    let err = agentwire::Gateway::new(cfg).err().expect("refused");
    assert!(err.to_string().contains("admin_listen"), "{err}");
}
