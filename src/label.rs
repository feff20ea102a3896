//! What a provider, API format or model name may hold, wherever one enters (an admission, a
//! settlement, an access-log record, an allow-list) — and what any stored name may not.

use std::ops::Deref;

/// Longest provider, API format or model name accepted, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

/// Most entries one allow-list may hold.
pub(crate) const MAX_ALLOW_LIST_LEN: usize = 1000;

/// Control characters are refused in every stored name: Postgres text cannot hold NUL, and
/// the allow-lists' separator in Redis is one (see admit.lua).
pub(crate) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A provider / API format / model name fit to be matched and stored.
pub fn is_label(value: &str) -> bool {
    value.len() <= MAX_LABEL_LEN && !has_control(value)
}

/// A provider, API format or model name that passed [`is_label`] where it entered, so that
/// nothing behind the edge checks it again. The default, `""`, is "not named": the key's
/// allow-lists then decide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Label(String);

/// A name over [`MAX_LABEL_LEN`] bytes or with a control character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidLabel;

impl Label {
    pub(crate) fn new(value: String) -> Result<Label, InvalidLabel> {
        if is_label(&value) {
            Ok(Label(value))
        } else {
            Err(InvalidLabel)
        }
    }

    /// An optional name as a request carries it: absent stays absent.
    pub(crate) fn optional(value: Option<String>) -> Result<Option<Label>, InvalidLabel> {
        value.map(Label::new).transpose()
    }
}

impl Deref for Label {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// A key's allow-list of providers, API formats or models: 1 to [`MAX_ALLOW_LIST_LEN`]
/// non-empty labels. No list (`None` where one is expected) means unrestricted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AllowList(Vec<String>);

/// Why an allow-list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InvalidAllowList {
    TooManyEntries,
    /// An entry is empty, or not a [`Label`].
    BadEntry,
}

impl AllowList {
    /// `[]` is no restriction, as no list is: `None`.
    pub(crate) fn new(entries: Vec<String>) -> Result<Option<AllowList>, InvalidAllowList> {
        if entries.is_empty() {
            return Ok(None);
        }
        if entries.len() > MAX_ALLOW_LIST_LEN {
            return Err(InvalidAllowList::TooManyEntries);
        }
        if entries.iter().any(|e| e.is_empty() || !is_label(e)) {
            return Err(InvalidAllowList::BadEntry);
        }
        Ok(Some(AllowList(entries)))
    }

    pub(crate) fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub(crate) fn into_vec(self) -> Vec<String> {
        self.0
    }
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
        assert_eq!(Label::new("gpt\0".into()), Err(InvalidLabel));
        assert_eq!(&*Label::new("gpt-4o".into()).unwrap(), "gpt-4o");
        assert_eq!(Label::optional(None), Ok(None));
        assert_eq!(Label::optional(Some("a\0".into())), Err(InvalidLabel));
    }

    #[test]
    fn allow_lists_hold_non_empty_labels() {
        let list = |v: &[&str]| AllowList::new(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(list(&[]), Ok(None));
        assert_eq!(list(&["openai"]).unwrap().unwrap().as_slice(), ["openai"]);
        assert_eq!(list(&[""]), Err(InvalidAllowList::BadEntry));
        assert_eq!(list(&["a\u{1f}b"]), Err(InvalidAllowList::BadEntry));
        let many = vec!["m"; MAX_ALLOW_LIST_LEN + 1];
        assert_eq!(list(&many), Err(InvalidAllowList::TooManyEntries));
        assert!(list(&vec!["m"; MAX_ALLOW_LIST_LEN]).is_ok());
    }
}
