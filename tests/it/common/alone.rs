//! Tests that need a whole process to themselves, inside the one test binary.
//!
//! All tests share this binary's process, so whatever is process-wide is shared too: the
//! Prometheus recorder (`tollgate::metrics::install`, one per process: every in-process server
//! counts into the same series) and the open-file limit. A test that measures exact metric
//! deltas, or changes a process-wide setting, starts with
//! `if !in_own_process(this_test!()).await { return; }`: in the test binary's own process that
//! runs the test again, alone, in a child process of the same binary, and fails when the child
//! fails; in the child it returns true and the test's body runs.

use std::process::Stdio;

/// Names the one test a child process was started for.
const ALONE: &str = "TOLLGATE_IT_ALONE";

/// The calling test's name as libtest knows it (`module::test`).
macro_rules! this_test {
    () => {{
        fn here() {}
        $crate::common::alone::test_name(std::any::type_name_of_val(&here))
    }};
}
pub(crate) use this_test;

/// `module::test` from the type name of an item inside the test (`it::module::test::here`,
/// maybe with `{{closure}}` segments): without the crate's name, which libtest leaves out.
pub fn test_name(item: &str) -> String {
    let segments: Vec<&str> = item
        .split("::")
        .skip(1)
        .filter(|s| *s != "{{closure}}")
        .collect();
    segments[..segments.len() - 1].join("::")
}

/// True in the child process started for `test` (run its body there); elsewhere runs `test`
/// alone in a child process of this binary, asserts that it ran and passed, and returns false.
pub async fn in_own_process(test: String) -> bool {
    if std::env::var(ALONE).is_ok_and(|t| t == test) {
        return true;
    }
    let out = tokio::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([test.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, &test)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{test}, alone in its own process, failed:\n{text}"
    );
    assert!(
        text.contains("test result: ok. 1 passed"),
        "{test} did not run in its own process:\n{text}"
    );
    false
}
