//! Provider, API format and model inferred from a proxied request's original path.
//!
//! A table of rules, each a path pattern matched against the end of the path (so a gateway
//! that mounts OpenAI under `/openai/v1/...` still matches), with an optional `{model}`
//! placeholder that captures one path segment piece. Users extend the built-in table with a
//! JSON file (`TOLLGATE_INFERENCE_RULES`); their rules are tried first.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rule {
    /// e.g. `/v1/chat/completions` or `/v1beta/models/{model}:generateContent`
    pub(crate) path: String,
    pub(crate) provider: String,
    pub(crate) api_format: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Inferred {
    pub(crate) provider: Option<String>,
    pub(crate) api_format: Option<String>,
    pub(crate) model: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Inference {
    rules: Vec<Rule>,
}

fn rule(path: &str, provider: &str, api_format: &str) -> Rule {
    Rule {
        path: path.into(),
        provider: provider.into(),
        api_format: api_format.into(),
    }
}

impl Default for Inference {
    fn default() -> Self {
        Inference {
            rules: vec![
                rule("/v1/chat/completions", "openai", "openai:chat"),
                rule("/v1/completions", "openai", "openai:completions"),
                rule("/v1/responses", "openai", "openai:responses"),
                rule("/v1/embeddings", "openai", "openai:embeddings"),
                rule("/v1/messages", "anthropic", "anthropic:messages"),
                rule(
                    "/v1beta/models/{model}:generateContent",
                    "gemini",
                    "gemini:generateContent",
                ),
                rule(
                    "/v1beta/models/{model}:streamGenerateContent",
                    "gemini",
                    "gemini:streamGenerateContent",
                ),
                rule(
                    "/v1/models/{model}:generateContent",
                    "gemini",
                    "gemini:generateContent",
                ),
                rule(
                    "/v1/models/{model}:streamGenerateContent",
                    "gemini",
                    "gemini:streamGenerateContent",
                ),
            ],
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("inference rules: {0}")]
pub struct RulesError(String);

impl Inference {
    /// The built-in table with `extra` rules (a JSON array of `{path, provider, api_format}`)
    /// tried first.
    pub fn with_extra_json(json: &str) -> Result<Self, RulesError> {
        let extra: Vec<Rule> = serde_json::from_str(json).map_err(|e| RulesError(e.to_string()))?;
        for r in &extra {
            if !r.path.starts_with('/') || r.path.matches("{model}").count() > 1 {
                return Err(RulesError(format!(
                    "path {:?} must start with / and hold at most one {{model}}",
                    r.path
                )));
            }
        }
        let mut rules = extra;
        rules.extend(Inference::default().rules);
        Ok(Inference { rules })
    }

    pub(crate) fn infer(&self, uri: &str) -> Inferred {
        let path = uri.split(['?', '#']).next().unwrap_or("");
        // Some HTTP clients percent-encode the `:` of Gemini's `models/<model>:<method>`.
        let decoded;
        let path = if path.contains('%') {
            decoded = path.replace("%3A", ":").replace("%3a", ":");
            decoded.as_str()
        } else {
            path
        };
        let path = path.trim_end_matches('/');
        for r in &self.rules {
            if let Some(model) = matches(&r.path, path) {
                return Inferred {
                    provider: Some(r.provider.clone()),
                    api_format: Some(r.api_format.clone()),
                    model,
                };
            }
        }
        Inferred::default()
    }
}

/// `Some(model)` when `pattern` matches the end of `path` at a segment boundary.
fn matches(pattern: &str, path: &str) -> Option<Option<String>> {
    match pattern.split_once("{model}") {
        // Patterns start with `/`, so a suffix match is always at a segment boundary.
        None => path.ends_with(pattern).then_some(None),
        Some((before, after)) => {
            let head = path.strip_suffix(after)?;
            let idx = head.rfind(before)?;
            let model = &head[idx + before.len()..];
            if model.is_empty() || model.contains('/') {
                return None;
            }
            Some(Some(model.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inf(p: &str) -> (Option<String>, Option<String>, Option<String>) {
        let i = Inference::default().infer(p);
        (i.provider, i.api_format, i.model)
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn the_builtin_table() {
        assert_eq!(
            inf("/v1/chat/completions"),
            (s("openai"), s("openai:chat"), None)
        );
        assert_eq!(
            inf("/v1/completions?x=1"),
            (s("openai"), s("openai:completions"), None)
        );
        assert_eq!(
            inf("/v1/responses"),
            (s("openai"), s("openai:responses"), None)
        );
        assert_eq!(
            inf("/v1/embeddings/"),
            (s("openai"), s("openai:embeddings"), None)
        );
        assert_eq!(
            inf("/v1/messages"),
            (s("anthropic"), s("anthropic:messages"), None)
        );
        assert_eq!(
            inf("/v1beta/models/gemini-2.0-flash:generateContent"),
            (
                s("gemini"),
                s("gemini:generateContent"),
                s("gemini-2.0-flash")
            )
        );
        assert_eq!(
            inf("/v1beta/models/gemini-pro:streamGenerateContent?alt=sse"),
            (
                s("gemini"),
                s("gemini:streamGenerateContent"),
                s("gemini-pro")
            )
        );
        assert_eq!(
            inf("/openai/v1/chat/completions"),
            (s("openai"), s("openai:chat"), None)
        );
        assert_eq!(
            inf("/v1beta/models/gemini-2.0-flash%3AgenerateContent"),
            (
                s("gemini"),
                s("gemini:generateContent"),
                s("gemini-2.0-flash")
            )
        );
        assert_eq!(inf("/healthz"), (None, None, None));
        assert_eq!(inf("/v1/chat/completionsX"), (None, None, None));
    }

    #[test]
    fn user_rules_come_first() {
        let i = Inference::with_extra_json(
            r#"[{"path": "/v1/chat/completions", "provider": "azure", "api_format": "openai:chat"},
                {"path": "/deployments/{model}/chat", "provider": "azure", "api_format": "azure:chat"}]"#,
        )
        .unwrap();
        assert_eq!(i.infer("/v1/chat/completions").provider, s("azure"));
        let d = i.infer("/openai/deployments/gpt4o/chat");
        assert_eq!((d.api_format, d.model), (s("azure:chat"), s("gpt4o")));
        assert_eq!(i.infer("/v1/messages").provider, s("anthropic"));
        assert!(Inference::with_extra_json(r#"[{"path": "x"}]"#).is_err());
    }
}
