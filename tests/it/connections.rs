//! Connection hygiene of both listeners (`http::serve`): header, body and idle timeouts, the connection cap, and JSON answers for the HTTP stack's own errors.
//!
//! Raw TCP clients, so that a test controls every byte and sees exactly what the server sends
//! and when it closes. Timeouts are set short through the settings.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer as read off the wire: the head's status and headers, and `body`.
fn wire_answer(head: String, body: &[u8]) -> Option<Answer> {
    let mut lines = head.lines();
    let status_line = lines.next()?.to_string();
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.append(
                HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                HeaderValue::from_str(value.trim()).ok()?,
            );
        }
    }
    let text = String::from_utf8_lossy(body).into_owned();
    Some(Answer::new(status_line, status, headers, text))
}

/// The contract's error shape as it goes over the wire.
trait OnTheWire {
    /// Exactly `application/json`, with this code and a message (a 503 too, which
    /// [`Answer::assert_error`] refuses as a 5xx).
    fn assert_wire_error(&self, status: u16, code: &str);
}

impl OnTheWire for Answer {
    #[track_caller]
    fn assert_wire_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{} {:?}", self.what, self.headers);
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{} {:?}",
            self.what,
            self.headers
        );
        let body = self.json();
        assert_eq!(body["code"], code, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
}

/// Reads one answer (head, then `content-length` bytes of body), within `within`.
async fn read_answer(s: &mut TcpStream, within: Duration) -> Option<Answer> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        wire_answer(head, &buf[head_end..head_end + len])
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}

/// Waits until the server closes `s` (EOF or reset); returns how long that took, or `None`
/// if it is still open after `within`. What arrives meanwhile is returned too.
async fn closed_within(s: &mut TcpStream, within: Duration) -> (Option<Duration>, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let wait = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(within, wait).await.is_ok();
    (closed.then(|| started.elapsed()), got)
}

fn parse_raw(bytes: &[u8]) -> Option<Answer> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_string();
    wire_answer(head, &bytes[head_end..])
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\n\r\n";

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.data_addr).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_its_headers_a_byte_a_second_is_closed_after_the_header_timeout() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_HEADER_TIMEOUT_SECONDS", "2".into());
    })
    .await;
    let s = connect(&app).await;
    let (mut read, mut write) = s.into_split();
    let drip = tokio::spawn(async move {
        for b in b"POST /v1/admit HTTP/1.1\r\nHost: tollgate\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa" {
            if write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    let took = started.elapsed();
    drip.abort();
    assert!(closed, "a slowloris client still connected after 8 s");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "closed after {took:?}, expected about the 2 s header timeout"
    );
    if let Some(answer) = parse_raw(&got) {
        answer.assert_wire_error(408, "request_timeout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_left_unfinished_is_answered_408_with_the_json_shape() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_HEADER_TIMEOUT_SECONDS", "1".into());
    })
    .await;
    let mut s = connect(&app).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\n")
        .await
        .expect("write");
    let (closed, got) = closed_within(&mut s, Duration::from_secs(5)).await;
    let took = closed.expect("closed after the header timeout");
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    parse_raw(&got)
        .expect("an answer before the close")
        .assert_wire_error(408, "request_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_as_a_terabyte_that_never_comes_is_answered_408_and_closed_after_the_body_timeout(
) {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_BODY_TIMEOUT_SECONDS", "2".into());
    })
    .await;
    let mut s = connect(&app).await;
    s.write_all(
        b"POST /v1/settle HTTP/1.1\r\nHost: tollgate\r\nContent-Type: application/json\r\n\
          Content-Length: 1000000000000\r\n\r\n{\"lease_id\"",
    )
    .await
    .expect("write");
    let (closed, got) = closed_within(&mut s, Duration::from_secs(8)).await;
    let took = closed.expect("the connection is closed after the body timeout, not held open");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "closed after {took:?}, expected about the 2 s body timeout"
    );
    let answer = parse_raw(&got).expect("an answer before the close");
    answer.assert_wire_error(408, "request_timeout");
    assert_eq!(answer.header("connection"), Some("close"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_and_is_closed_after_the_idle_timeout(
) {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_HEADER_TIMEOUT_SECONDS", "1".into());
        s.insert("TOLLGATE_IDLE_TIMEOUT_SECONDS", "3".into());
    })
    .await;
    let mut s = connect(&app).await;
    s.write_all(HEALTHZ).await.expect("write");
    let a = read_answer(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert_eq!(a.status, 200);
    // Idle for longer than the header timeout: still open (the header timeout only runs once
    // a request has started).
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(HEALTHZ).await.expect("write");
    let a = read_answer(&mut s, Duration::from_secs(5))
        .await
        .expect("the kept-alive connection still answers after 1.8 s idle");
    assert_eq!(a.status, 200);
    let (closed, got) = closed_within(&mut s, Duration::from_secs(8)).await;
    let took = closed.expect("the idle connection is closed");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(5),
        "idle connection closed after {took:?}, expected about 3 s"
    );
    assert!(
        got.is_empty(),
        "nothing is sent to an idle connection: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_above_the_cap_are_refused_with_503_while_open_ones_keep_working() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_MAX_CONNECTIONS", "2".into());
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&app).await;
        s.write_all(HEALTHZ).await.expect("write");
        let a = read_answer(&mut s, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(a.status, 200);
        open.push(s);
    }
    let mut third = connect(&app).await;
    let _ = third.write_all(HEALTHZ).await;
    let a = read_answer(&mut third, Duration::from_secs(5))
        .await
        .expect("the connection over the cap gets an answer");
    a.assert_wire_error(503, "unavailable");
    assert_eq!(a.header("retry-after"), Some("1"));
    let (closed, _) = closed_within(&mut third, Duration::from_secs(3)).await;
    assert!(closed.is_some(), "the refused connection is closed");

    for s in &mut open {
        s.write_all(HEALTHZ).await.expect("write");
        let a = read_answer(s, Duration::from_secs(5))
            .await
            .expect("open connections keep working");
        assert_eq!(a.status, 200);
    }
    // A place freed is a place taken again.
    drop(open.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = connect(&app).await;
        let _ = s.write_all(HEALTHZ).await;
        if let Some(a) = read_answer(&mut s, Duration::from_secs(5)).await {
            if a.status == 200 {
                again = Some(a);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "a closed connection frees its place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_the_http_stack_itself_carry_the_json_shape() {
    let app = spawn_app().await;

    let mut s = connect(&app).await;
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: tollgate\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    read_answer(&mut s, Duration::from_secs(5))
        .await
        .expect("an answer to oversized headers")
        .assert_wire_error(431, "headers_too_large");

    let mut s = connect(&app).await;
    s.write_all(b"NOT A REQUEST\r\n\r\n").await.expect("write");
    read_answer(&mut s, Duration::from_secs(5))
        .await
        .expect("an answer to a malformed request line")
        .assert_wire_error(400, "bad_request");

    // The stack's errors do not disturb ordinary answers on the next connection.
    let mut s = connect(&app).await;
    s.write_all(HEALTHZ).await.expect("write");
    let a = read_answer(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["status"], "ok");
}
