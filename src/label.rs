//! What a provider, API format or model name may hold, wherever one enters (an admission, a
//! settlement, an access-log record, an allow-list) — and what any stored name may not.

/// Longest provider, API format or model name accepted, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

/// Control characters are refused in every stored name: Postgres text cannot hold NUL, and
/// the allow-lists' separator in Redis is one (see admit.lua).
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A provider / API format / model name fit to be matched and stored.
pub fn is_label(value: &str) -> bool {
    value.len() <= MAX_LABEL_LEN && !has_control(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_free_of_control_characters() {
        assert!(is_label(""));
        assert!(is_label(&"m".repeat(MAX_LABEL_LEN)));
        assert!(!is_label(&"m".repeat(MAX_LABEL_LEN + 1)));
        assert!(!is_label("gpt\u{1f}4o"));
        assert!(!is_label("gpt\0"));
        assert!(is_label("claude-3.5-sonnet@2024"));
    }
}
