//! The conformance echo route `GET /conformance/echo` (docs/CONFORMANCE.md).
//!
//! A default build must not have it: the path is an ordinary 404 `not_found`, even for
//! a valid upgrade with a valid token in every place a token may be. A build with
//! `--features conformance` (tools/autobahn.sh) echoes every message back with the
//! production limits and authentication; those tests run only in that build.

use crate::support::{assert_refusal, token, upgrade, TestGateway};

/// The path the Autobahn run drives.
const ECHO_PATH: &str = "/conformance/echo";

/// `mode=echo` is never a valid mode on `/ws`, with or without the feature.
#[test]
fn mode_echo_on_ws_is_400() {
    let gw = TestGateway::plain();
    let r = upgrade(
        gw.addr,
        &format!("/ws?mode=echo&token={}", token("conf-mode")),
        &[],
    );
    assert_refusal(&r, 400, "bad_request");
}

/// Regression guard: the echo route exists only in conformance builds.
#[cfg(not(feature = "conformance"))]
#[test]
fn default_build_has_no_echo_route() {
    use crate::support::{bearer, get};

    let gw = TestGateway::plain();
    let t = token("conf-404");
    // Query token (what the Autobahn run uses), bearer header, trailing slash.
    let r = upgrade(gw.addr, &format!("{ECHO_PATH}?token={t}"), &[]);
    assert_refusal(&r, 404, "not_found");
    let r = upgrade(gw.addr, ECHO_PATH, &[bearer(&t)]);
    assert_refusal(&r, 404, "not_found");
    let r = upgrade(gw.addr, &format!("{ECHO_PATH}/?token={t}"), &[]);
    assert_refusal(&r, 404, "not_found");
    // A plain GET too (no upgrade headers).
    assert_refusal(&get(gw.addr, ECHO_PATH), 404, "not_found");
    // The gateway is unharmed: a normal session still opens.
    let c = gw.connect("conf-404");
    c.close();
}

#[cfg(feature = "conformance")]
mod echo {
    use std::net::TcpStream;
    use std::time::Instant;

    use tungstenite::client::IntoClientRequest;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::CloseFrame;
    use tungstenite::{Message, WebSocket};

    use super::ECHO_PATH;
    use crate::support::{assert_refusal, config, token, upgrade, Agent, TestGateway, WAIT};

    type Ws = WebSocket<TcpStream>;

    fn open(addr: std::net::SocketAddr, query: &str) -> Ws {
        let stream = TcpStream::connect_timeout(&addr, WAIT).expect("tcp connect");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        stream.set_write_timeout(Some(WAIT)).expect("write timeout");
        let request = format!("ws://{addr}{ECHO_PATH}?{query}")
            .into_client_request()
            .expect("request");
        let (ws, response) = tungstenite::client::client_with_config(request, stream, None)
            .expect("echo upgrade accepted");
        assert_eq!(response.status(), 101);
        ws
    }

    /// The next text, binary or close message, within [`WAIT`].
    fn next(ws: &mut Ws) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no message within {WAIT:?}");
            match ws.read().expect("read from the echo session") {
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                m => return m,
            }
        }
    }

    #[test]
    fn echoes_text_as_text_and_binary_as_binary_without_a_connected_frame() {
        let gw = TestGateway::plain();
        let mut ws = open(gw.addr, &format!("token={}", token("conf-echo")));
        ws.send(Message::text("{\"type\":\"ping\"}")).expect("send");
        // The very first frame is the echo: no `connected` frame, no pong JSON.
        assert_eq!(next(&mut ws), Message::text("{\"type\":\"ping\"}"));
        ws.send(Message::binary(vec![0u8, 1, 2, 255]))
            .expect("send");
        assert_eq!(next(&mut ws), Message::binary(vec![0u8, 1, 2, 255]));
        ws.send(Message::text("")).expect("send");
        assert_eq!(next(&mut ws), Message::text(""));
        ws.close(None).expect("close");
        match next(&mut ws) {
            Message::Close(_) => {}
            other => panic!("expected the close reply, got {other:?}"),
        }
    }

    #[test]
    fn fragments_are_reassembled_into_one_message() {
        let gw = TestGateway::plain();
        let mut ws = open(gw.addr, &format!("token={}", token("conf-frag")));
        let parts: [&[u8]; 3] = [b"frag", b"men", b"ted"];
        for (i, part) in parts.iter().enumerate() {
            let opcode = if i == 0 {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            let last = i + 1 == parts.len();
            ws.write(Message::Frame(Frame::message(part.to_vec(), opcode, last)))
                .expect("write fragment");
        }
        ws.flush().expect("flush");
        assert_eq!(next(&mut ws), Message::text("fragmented"));
    }

    #[test]
    fn production_message_limit_closes_1009() {
        let mut cfg = config();
        cfg.max_message_bytes = 1024;
        let gw = TestGateway::start(cfg, Agent::None);
        let mut ws = open(gw.addr, &format!("token={}", token("conf-big")));
        ws.send(Message::binary(vec![7u8; 1024])).expect("send");
        assert_eq!(next(&mut ws), Message::binary(vec![7u8; 1024]));
        let _ = ws.send(Message::binary(vec![7u8; 1025]));
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no close 1009 within {WAIT:?}");
            match ws.read() {
                Ok(Message::Close(Some(CloseFrame { code, .. }))) => {
                    assert_eq!(u16::from(code), 1009);
                    break;
                }
                Ok(Message::Close(None)) => panic!("close without a code"),
                Ok(_) => continue,
                Err(e) => panic!("connection ended without close 1009: {e}"),
            }
        }
    }

    #[test]
    fn normal_authentication_applies() {
        let gw = TestGateway::plain();
        assert_refusal(&upgrade(gw.addr, ECHO_PATH, &[]), 401, "invalid_token");
        assert_refusal(
            &upgrade(gw.addr, &format!("{ECHO_PATH}?token=not.a.jwt"), &[]),
            401,
            "invalid_token",
        );
        let expired = crate::support::token_with(
            &serde_json::json!({"sub": "conf-exp", "exp": crate::support::now_s() - 3600}),
        );
        assert_refusal(
            &upgrade(gw.addr, &format!("{ECHO_PATH}?token={expired}"), &[]),
            401,
            "invalid_token",
        );
        // The echo session is not the user's: it takes no per-user slot and gets no
        // events, so a normal session of the same user still opens alongside it.
        let mut ws = open(gw.addr, &format!("token={}", token("conf-auth")));
        let c = gw.connect("conf-auth");
        ws.send(Message::text("still here")).expect("send");
        assert_eq!(next(&mut ws), Message::text("still here"));
        c.close();
        let _ = ws.close(None);
    }
}
