//! One HTTP answer, from tollgate or a proxy in front of it, and the contract's checks on it.

use reqwest::header::{HeaderMap, CONTENT_TYPE};
use serde_json::{json, Value};

use super::nanos;

/// One answer: status, headers and body, and what was asked (for failure messages).
#[derive(Debug, Clone)]
pub struct Answer {
    /// The request, e.g. `POST /v1/admit`.
    pub what: String,
    pub status: u16,
    pub headers: HeaderMap,
    /// The body as it came.
    pub text: String,
    /// The body as JSON; `Null` when it is not JSON.
    pub body: Value,
}

impl Answer {
    pub fn new(what: String, status: u16, headers: HeaderMap, text: String) -> Answer {
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            what,
            status,
            headers,
            text,
            body,
        }
    }

    /// Reads `res` to its end; `what` names the request.
    pub async fn read(what: String, res: reqwest::Response) -> Answer {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res
            .text()
            .await
            .unwrap_or_else(|e| panic!("{what}: no body: {e}"));
        Answer::new(what, status, headers, text)
    }

    /// The body as JSON; fails when it is not JSON.
    #[track_caller]
    pub fn json(&self) -> &Value {
        if let Err(e) = serde_json::from_str::<Value>(&self.text) {
            panic!("{}: body is not JSON ({e}): {:?}", self.what, self.text);
        }
        &self.body
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error code of the body.
    pub fn code(&self) -> Option<&str> {
        self.body["code"].as_str()
    }

    /// `200`, or `<status> <code>`: what tallies count.
    pub fn outcome(&self) -> String {
        if self.status == 200 {
            "200".into()
        } else {
            format!("{} {}", self.status, self.code().unwrap_or("?"))
        }
    }

    /// Asserts an allowed admission and returns its lease id.
    #[track_caller]
    pub fn lease(&self, what: &str) -> String {
        assert_eq!(
            self.status, 200,
            "{what}: expected allowed, got {}",
            self.body
        );
        assert_eq!(self.body["allowed"], json!(true), "{what}: {}", self.body);
        self.body["lease_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no lease_id in {}", self.body))
            .to_string()
    }

    /// Asserts a denial with this status and code.
    #[track_caller]
    pub fn denied(&self, status: u16, code: &str, what: &str) {
        assert_eq!(
            (self.status, self.code()),
            (status, Some(code)),
            "{what}: expected {status} {code}, got {} {}",
            self.status,
            self.body
        );
        assert_eq!(self.body["allowed"], json!(false), "{what}: {}", self.body);
        assert!(
            self.body["message"].is_string(),
            "{what}: no message in {}",
            self.body
        );
    }

    /// `balance_remaining_usd` in nano-USD (`None` when null).
    #[track_caller]
    pub fn balance(&self) -> Option<i64> {
        let v = &self.body["balance_remaining_usd"];
        (!v.is_null()).then(|| nanos(v))
    }

    #[track_caller]
    pub fn retry_after_ms(&self) -> u64 {
        self.body["retry_after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no retry_after_ms in {}", self.body))
    }

    /// Not a 5xx, and every non-2xx has `{"code", "message"}` as JSON.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(
            self.status < 500,
            "{}: {} {}",
            self.what,
            self.status,
            self.text
        );
        if self.status >= 400 {
            let ct = self.header(CONTENT_TYPE.as_str()).unwrap_or("");
            assert!(
                ct.starts_with("application/json"),
                "{}: content-type {ct:?} of {} {}",
                self.what,
                self.status,
                self.text
            );
            let v = self.json();
            let code = v["code"].as_str().unwrap_or("");
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}: snake_case code in {v}",
                self.what
            );
            assert!(
                v["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{}: message in {v}",
                self.what
            );
        }
    }

    /// The contract's error shape with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        self.assert_clean();
        assert_eq!(self.status, status, "{}: {}", self.what, self.text);
        assert_eq!(self.json()["code"], code, "{}: {}", self.what, self.text);
    }

    /// Neither the body nor any header holds `secret`.
    #[track_caller]
    pub fn assert_no_echo(&self, secret: &str) {
        assert!(
            !self.text.contains(secret),
            "{}: the body echoes the key: {}",
            self.what,
            self.text
        );
        for (name, value) in &self.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(secret),
                "{}: header {name} echoes the key",
                self.what
            );
        }
    }
}

/// Reads `res` and asserts the contract's error shape with this status and code.
pub async fn assert_fails(res: reqwest::Response, status: u16, code: &str) {
    let what = res.url().path().to_string();
    Answer::read(what, res).await.assert_error(status, code);
}
