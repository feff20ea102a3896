//! One access-log record → what became of a lease: settled (with cost and tokens) or released.
//!
//! A record is one JSON object, optionally behind a syslog header (RFC 3164 as nginx sends it,
//! RFC 5424 as HAProxy and rsyslog can). Two shapes are read:
//!
//! - the contract's flat record: `lease_id`, `status`, `cost_usd`, `input_tokens`,
//!   `output_tokens`, `cached_input_tokens`, `total_tokens`, `model`, `provider`, `api_format`,
//!   `response_time_ms`;
//! - Caddy's own access log (`format json`): `status`, `duration` (seconds) and the response
//!   headers `resp_headers`, where the lease id is `X-Tollgate-Lease-Id` and an upstream's
//!   cost `X-Tollgate-Cost-Usd` or `X-Litellm-Response-Cost` (see [`COST_HEADERS`]).
//!
//! Proxies write every variable as a string (`escape=json`), so numbers may come as strings,
//! and `""` or `"-"` (nginx's "no value") count as absent. Unknown fields are ignored: a
//! proxy's log line carries much more than tollgate needs.

use serde_json::{Map, Value};

use crate::label::Label;
use crate::money::Money;

/// Response headers that carry an upstream's cost of the request, in USD, first found wins:
/// tollgate's own name, then the one LiteLLM's proxy sends.
pub(crate) const COST_HEADERS: [&str; 2] = ["x-tollgate-cost-usd", "x-litellm-response-cost"];
/// Response headers with token counts, for an upstream that can send them.
const INPUT_TOKENS_HEADER: &str = "x-tollgate-input-tokens";
const OUTPUT_TOKENS_HEADER: &str = "x-tollgate-output-tokens";
const CACHED_TOKENS_HEADER: &str = "x-tollgate-cached-input-tokens";
const LEASE_HEADER: &str = "x-tollgate-lease-id";

/// Bounds of what one record may report; the same as `/v1/settle`'s.
const MAX_TOKENS: u64 = 1 << 40;
const MAX_RESPONSE_TIME_MS: u64 = 1 << 31;
const MAX_COST_NANOS: i64 = crate::money::MAX_EXACT;

/// What a record asks tollgate to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Report {
    Settle(Settlement),
    Release { lease_id: String },
}

/// A request that got an answer: its lease is settled like `POST /v1/settle` would.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Settlement {
    pub(crate) lease_id: String,
    pub(crate) status: Option<u16>,
    /// `None`: priced from the tokens where a price is known, else 0.
    pub(crate) cost: Option<Money>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) cached_input_tokens: Option<u64>,
    pub(crate) total_tokens: Option<u64>,
    pub(crate) response_time_ms: Option<u64>,
    pub(crate) provider: Option<Label>,
    pub(crate) api_format: Option<Label>,
    pub(crate) model: Option<Label>,
}

/// Why a record was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Not a JSON object, or a field of the wrong kind.
    Malformed,
    /// Names no lease (a denied request, or an admission that took none).
    NoLease,
}

/// The JSON object of a datagram or line, behind its syslog header if it has one.
fn json_part(raw: &[u8]) -> Option<&[u8]> {
    let text = trim_ascii(raw);
    if text.first() == Some(&b'{') {
        return Some(text);
    }
    if text.first() != Some(&b'<') {
        return None;
    }
    let close = text.iter().take(5).position(|b| *b == b'>')?;
    let after_pri = &text[close + 1..];
    if after_pri.starts_with(b"1 ") {
        return rfc5424_message(&after_pri[2..]);
    }
    // RFC 3164: `Mmm dd hh:mm:ss host tag: message`; none of the header's parts holds a brace.
    let start = after_pri.iter().position(|b| *b == b'{')?;
    Some(&after_pri[start..])
}

/// RFC 5424 after `<PRI>1 `: TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG.
/// Structured data may hold braces inside quoted values, so it is skipped by its grammar.
fn rfc5424_message(mut rest: &[u8]) -> Option<&[u8]> {
    for _ in 0..5 {
        let space = rest.iter().position(|b| *b == b' ')?;
        rest = &rest[space + 1..];
    }
    if rest.first() == Some(&b'-') {
        rest = &rest[1..];
    } else {
        while rest.first() == Some(&b'[') {
            let mut i = 1;
            let mut quoted = false;
            loop {
                match rest.get(i)? {
                    b'\\' if quoted => i += 1,
                    b'"' => quoted = !quoted,
                    b']' if !quoted => break,
                    _ => {}
                }
                i += 1;
            }
            rest = &rest[i + 1..];
        }
    }
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    // A UTF-8 byte-order mark may open the message.
    let rest = rest.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(rest);
    Some(trim_ascii(rest))
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// A field's text: strings as they are, numbers as written; `None` when absent, null, `""`
/// or `"-"`. `Err` for objects, arrays and booleans.
fn text(v: Option<&Value>) -> Result<Option<String>, Dropped> {
    let t = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(Dropped::Malformed),
    };
    Ok((!t.is_empty() && t != "-").then_some(t))
}

/// Null, `""` or `"-"`: a field the proxy had no value for.
fn absent(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => matches!(s.trim(), "" | "-"),
        _ => false,
    }
}

fn count(v: Option<&Value>, max: u64) -> Result<Option<u64>, Dropped> {
    text(v)?
        .map(|t| {
            t.parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or(Dropped::Malformed)
        })
        .transpose()
}

fn cost(v: Option<&Value>) -> Result<Option<Money>, Dropped> {
    text(v)?
        .map(|t| {
            Money::parse_ceil(&t)
                .ok()
                .filter(|m| !m.is_negative() && m.nanos() <= MAX_COST_NANOS)
                .ok_or(Dropped::Malformed)
        })
        .transpose()
}

fn label(v: Option<&Value>) -> Result<Option<Label>, Dropped> {
    text(v)?
        .map(|l| Label::new(l).map_err(|_| Dropped::Malformed))
        .transpose()
}

/// A header of Caddy's `resp_headers` (`{"Name": ["value", …]}`), by case-insensitive name.
fn header<'a>(headers: Option<&'a Map<String, Value>>, name: &str) -> Option<&'a Value> {
    let (_, values) = headers?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))?;
    match values {
        Value::Array(v) => v.first(),
        other => Some(other),
    }
}

/// Caddy's `duration`: seconds as a decimal number.
fn duration_ms(v: Option<&Value>) -> Result<Option<u64>, Dropped> {
    text(v)?
        .map(|t| {
            t.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| (s * 1000.0).round() as u64)
                .filter(|ms| *ms <= MAX_RESPONSE_TIME_MS)
                .ok_or(Dropped::Malformed)
        })
        .transpose()
}

/// Reads one record.
pub(crate) fn parse(raw: &[u8]) -> Result<Report, Dropped> {
    let json = json_part(raw).ok_or(Dropped::Malformed)?;
    let obj: Map<String, Value> = serde_json::from_slice(json).map_err(|_| Dropped::Malformed)?;
    let resp = obj.get("resp_headers").and_then(Value::as_object);
    let field = |name: &str| obj.get(name);
    // The flat field first; Caddy's response header where the flat one is absent.
    let either = |flat: &str, hdr: &str| -> Option<&Value> {
        field(flat)
            .filter(|v| !absent(v))
            .or_else(|| header(resp, hdr))
    };
    let lease_id = text(either("lease_id", LEASE_HEADER))?.ok_or(Dropped::NoLease)?;
    let cost_value = field("cost_usd")
        .filter(|v| !absent(v))
        .or_else(|| COST_HEADERS.iter().find_map(|h| header(resp, h)));
    let response_time_ms = match field("response_time_ms") {
        Some(v) => count(Some(v), MAX_RESPONSE_TIME_MS)?,
        None if resp.is_some() => duration_ms(field("duration"))?,
        None => None,
    };
    let s = Settlement {
        status: count(field("status"), u64::from(u16::MAX))?.and_then(|n| u16::try_from(n).ok()),
        cost: cost(cost_value)?,
        input_tokens: count(either("input_tokens", INPUT_TOKENS_HEADER), MAX_TOKENS)?,
        output_tokens: count(either("output_tokens", OUTPUT_TOKENS_HEADER), MAX_TOKENS)?,
        cached_input_tokens: count(
            either("cached_input_tokens", CACHED_TOKENS_HEADER),
            MAX_TOKENS,
        )?,
        total_tokens: count(field("total_tokens"), MAX_TOKENS)?,
        response_time_ms,
        provider: label(field("provider"))?,
        api_format: label(field("api_format"))?,
        model: label(field("model"))?,
        lease_id,
    };
    if s.cached_input_tokens.unwrap_or(0) > s.input_tokens.unwrap_or(0) {
        return Err(Dropped::Malformed);
    }
    Ok(if s.ends_without_answer() {
        Report::Release {
            lease_id: s.lease_id,
        }
    } else {
        Report::Settle(s)
    })
}

impl Settlement {
    /// The contract's rule: an upstream failure (≥ 500), a client that left before an answer
    /// (499, or 0), or no status at all with nothing to charge, frees the lease unpaid.
    fn ends_without_answer(&self) -> bool {
        let nothing_to_charge = self.cost.is_none()
            && self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.total_tokens.is_none();
        match self.status {
            Some(s) => s >= 500 || s == 0 || s == 499,
            None => nothing_to_charge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: &str = "0123456789abcdef0123456789abcdef.AAAAAAAAAAAAAAAAAAAAAA";

    fn settle(raw: &str) -> Settlement {
        match parse(raw.as_bytes()) {
            Ok(Report::Settle(s)) => s,
            other => panic!("{raw}: {other:?}"),
        }
    }

    #[test]
    fn a_flat_record_with_numbers_as_strings_settles() {
        let s = settle(&format!(
            r#"{{"lease_id":"{LEASE}","status":"200","cost_usd":"0.012345678","input_tokens":"120","output_tokens":380,"cached_input_tokens":"-","model":"gpt-4o","response_time_ms":"840"}}"#
        ));
        assert_eq!(s.lease_id, LEASE);
        assert_eq!(s.status, Some(200));
        assert_eq!(s.cost, Some(Money::from_nanos(12_345_678)));
        assert_eq!((s.input_tokens, s.output_tokens), (Some(120), Some(380)));
        assert_eq!(s.cached_input_tokens, None);
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        assert_eq!(s.response_time_ms, Some(840));
    }

    #[test]
    fn syslog_headers_of_both_rfcs_are_stripped() {
        let body = format!(r#"{{"lease_id":"{LEASE}","status":200}}"#);
        for raw in [
            format!("<190>Nov 27 09:00:00 gw nginx: {body}"),
            format!("<190>Nov 27 09:00:00 nginx: {body}\n"),
            format!("<134>1 2026-11-27T09:00:00.000Z gw haproxy 123 - - {body}"),
            format!(
                r#"<134>1 2026-11-27T09:00:00Z gw app - ID7 [ex@1 a="{{x]\"" b="y"][z@1] {body}"#
            ),
            format!("<134>1 2026-11-27T09:00:00Z gw app - - - \u{feff}{body}"),
        ] {
            assert_eq!(settle(&raw).lease_id, LEASE, "{raw}");
        }
    }

    #[test]
    fn failures_and_departures_release() {
        for status in ["502", "500", "0", "499", "503"] {
            let raw = format!(r#"{{"lease_id":"{LEASE}","status":"{status}","cost_usd":"1"}}"#);
            assert_eq!(
                parse(raw.as_bytes()),
                Ok(Report::Release {
                    lease_id: LEASE.into()
                }),
                "{status}"
            );
        }
        let bare = format!(r#"{{"lease_id":"{LEASE}","status":"","cost_usd":"-"}}"#);
        assert!(matches!(parse(bare.as_bytes()), Ok(Report::Release { .. })));
        // No status but tokens: the request was answered.
        let tokens = format!(r#"{{"lease_id":"{LEASE}","output_tokens":"5"}}"#);
        assert!(matches!(parse(tokens.as_bytes()), Ok(Report::Settle(_))));
        let ok = format!(r#"{{"lease_id":"{LEASE}","status":404}}"#);
        assert!(matches!(parse(ok.as_bytes()), Ok(Report::Settle(_))));
    }

    #[test]
    fn caddys_own_access_log_shape_is_read() {
        let raw = format!(
            r#"{{"level":"info","ts":1.7e9,"logger":"http.log.access","msg":"handled request","request":{{"method":"POST","headers":{{"Authorization":["REDACTED"]}}}},"duration":0.8404,"size":12,"status":200,"resp_headers":{{"X-Tollgate-Lease-Id":["{LEASE}"],"X-Litellm-Response-Cost":["0.0000000001"],"Content-Type":["application/json"]}}}}"#
        );
        let s = settle(&raw);
        assert_eq!(s.lease_id, LEASE);
        assert_eq!(s.status, Some(200));
        assert_eq!(s.cost, Some(Money::from_nanos(1)), "rounded up");
        assert_eq!(s.response_time_ms, Some(840));
    }

    #[test]
    fn what_cannot_be_read_is_dropped_with_its_reason() {
        for raw in [
            "garbage".to_string(),
            "<13>".to_string(),
            "[1,2]".to_string(),
            format!(r#"{{"lease_id":"{LEASE}","status":"two hundred"}}"#),
            format!(r#"{{"lease_id":"{LEASE}","cost_usd":"-1"}}"#),
            format!(r#"{{"lease_id":"{LEASE}","input_tokens":1.5}}"#),
            format!(r#"{{"lease_id":"{LEASE}","model":{{"x":1}}}}"#),
            format!(r#"{{"lease_id":"{LEASE}","input_tokens":1,"cached_input_tokens":2}}"#),
            format!(r#"{{"lease_id":"{LEASE}","model":"a\u0000b"}}"#),
        ] {
            assert_eq!(parse(raw.as_bytes()), Err(Dropped::Malformed), "{raw}");
        }
        let wrong_kind = r#"{"lease_id":["x"],"status":200}"#;
        assert_eq!(parse(wrong_kind.as_bytes()), Err(Dropped::Malformed));
        for raw in [r#"{"status":200}"#, r#"{"lease_id":"-","status":200}"#] {
            assert_eq!(parse(raw.as_bytes()), Err(Dropped::NoLease), "{raw}");
        }
    }
}
