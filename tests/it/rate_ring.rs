//! The rate ring (`lua/lib/ring.lua`) decides exactly what an exact sliding window decides: its
//! functions, run in Redis on simulated clocks, against a model that remembers every admission.

use crate::common;

use common::*;

/// Drives lib/ring.lua the way admit.lua does: for each (time, limit) of ARGV, read the cursor,
/// deny when the window is full (answering the wait until the entry that must leave does), or
/// write the admission (answering the admissions left and the wait until the oldest leaves).
/// KEYS[1] a hash for the cursor, KEYS[2] the ring; ARGV[1] window (ms), then pairs.
const DRIVER: &str = r#"
local window = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 2 do
  local now, limit = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local at = {ring_read(KEYS[2], redis.call('HGET', KEYS[1], 'rw'), now, window)}
  local clock = at[6]
  local count = at[1] - at[2]
  if count >= limit then
    local k = 0
    if count > limit then k = count - limit end
    local leaving = ring_time(KEYS[2], at[2], at[3], at[5], k)
    out[#out + 1] = 'deny'
    out[#out + 1] = string.format('%.0f', leaving + window - clock)
  else
    local cursor, oldest = ring_add(KEYS[2], at[1], at[2], at[3], at[4], at[5], limit, clock,
      window)
    redis.call('HSET', KEYS[1], 'rw', cursor)
    out[#out + 1] = string.format('%.0f', limit - count - 1)
    out[#out + 1] = string.format('%.0f', oldest + window - clock)
  end
end
return out
"#;

/// What an exact window answers: every admission remembered, with the time it was stamped.
struct Model {
    window: i64,
    stamps: Vec<i64>,
}

impl Model {
    fn admit(&mut self, now: i64, limit: i64) -> (String, i64) {
        // The window's clock never runs backwards: a step back counts as no time passing.
        let now = now.max(self.stamps.last().copied().unwrap_or(0));
        let edge = now - self.window;
        let inside: Vec<i64> = self.stamps.iter().copied().filter(|&t| t > edge).collect();
        let count = inside.len() as i64;
        if count >= limit {
            let leaving = inside[(count - limit) as usize];
            return ("deny".into(), leaving + self.window - now);
        }
        self.stamps.push(now);
        let oldest = inside.first().copied().unwrap_or(now);
        ((limit - count - 1).to_string(), oldest + self.window - now)
    }
}

/// xorshift64: the test's own deterministic choices, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

async fn run_against_model(seed: u64, limits: &[i64], events: usize) {
    require_services().await;
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let tag = unique("ring");
    let (cursor, ring) = (format!("{tag}:{{{tag}}}:k"), format!("{tag}:{{{tag}}}:q"));
    let source = format!("{}{DRIVER}", include_str!("../../lua/lib/ring.lua"));
    let script = redis::Script::new(&source);
    let window = 1_000;
    // Simulated time starts at the real clock, so the ring's expiries lie ahead and Redis keeps it.
    let mut now = chrono::Utc::now().timestamp_millis();
    let mut model = Model {
        window,
        stamps: Vec::new(),
    };
    let mut rng = Rng(seed);
    let mut limit = limits[0];
    let mut sent = 0;
    while sent < events {
        let mut call = script.prepare_invoke();
        call.key(&cursor).key(&ring).arg(window);
        let mut expected = Vec::new();
        for _ in 0..200 {
            // Bursts, small gaps, whole idle windows, and now and then a clock that steps back.
            now += match rng.next(100) {
                0..=49 => 0,
                50..=89 => rng.next(40) as i64,
                90..=95 => rng.next(400) as i64,
                96..=97 => window + rng.next(500) as i64,
                _ => -(rng.next(20) as i64),
            };
            if rng.next(400) == 0 {
                limit = limits[rng.next(limits.len() as u64) as usize];
            }
            call.arg(now).arg(limit);
            expected.push(model.admit(now, limit));
        }
        let got: Vec<String> = call.invoke_async(&mut c).await.expect("driver");
        for (i, pair) in got.chunks(2).enumerate() {
            let (what, wait) = &expected[i];
            assert_eq!(
                (pair[0].as_str(), pair[1].parse::<i64>().expect("number")),
                (what.as_str(), *wait),
                "seed {seed}, event {}: (admissions left | deny, wait ms)",
                sent + i
            );
        }
        sent += expected.len();
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&cursor)
        .arg(&ring)
        .query_async(&mut c)
        .await
        .expect("del");
}

#[tokio::test]
async fn the_ring_answers_as_an_exact_window_through_bursts_idle_windows_and_a_clock_stepping_back()
{
    for seed in [1, 2, 3] {
        run_against_model(0x9e37_79b9_7f4a_7c15 ^ seed, &[40], 6_000).await;
    }
}

#[tokio::test]
async fn the_ring_answers_as_an_exact_window_while_the_limit_is_raised_and_lowered() {
    // From below the ring's first size (16) to several times it, so it grows with entries in
    // it, and a lowered limit leaves more in the window than it allows.
    for seed in [4, 5] {
        run_against_model(0x2545_f491_4f6c_dd1d ^ seed, &[3, 17, 100, 1, 250], 8_000).await;
    }
}
