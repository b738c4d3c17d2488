//! The windows of models outside the table, learned from their providers' refusals: a prompt
//! too long for an unlisted model is refused with its maximum in the message ("maximum context
//! length is 8192 tokens", "… tokens > 200000 maximum"); the call is fitted to it and made again,
//! and later calls of that model in this process are fitted before they are sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a learned window is trusted: a provider may serve a larger model under the same
/// name later (the worst case meanwhile is a history trimmed more than needed).
const LEARNED_FOR: Duration = Duration::from_secs(3600);
/// Models remembered at most; the map is emptied when full (names are the operator's and
/// tenants' choice, so it must stay bounded).
const MAX_LEARNED: usize = 1024;
/// Windows below this are not believed (a number quoted from elsewhere in the message).
const MIN_WINDOW: u32 = 64;

/// The window a provider's context-length refusal states, if it states one.
pub fn stated_window(message: &str) -> Option<u32> {
    let lower = message.to_ascii_lowercase();
    // OpenAI, Azure, vLLM, OpenRouter: "maximum context length is 8192 tokens"
    let after = ["maximum context length is ", "maximum context length of "]
        .iter()
        .find_map(|p| lower.find(p).map(|i| number_at(&lower[i + p.len()..])));
    // Anthropic: "prompt is too long: 210000 tokens > 200000 maximum"; Mistral: "... too large
    // for model with 32768 maximum context length"
    let before = || {
        lower
            .match_indices(" maximum")
            .find_map(|(i, _)| number_before(&lower[..i]))
    };
    after.flatten().or_else(before).filter(|w| *w >= MIN_WINDOW)
}

/// The number (digits, thousands separated by commas or not) at the start of `s`.
fn number_at(s: &str) -> Option<u32> {
    let digits: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The number that `s` ends with.
fn number_before(s: &str) -> Option<u32> {
    let start = s
        .rfind(|c: char| !(c.is_ascii_digit() || c == ','))
        .map_or(0, |i| i + 1);
    number_at(&s[start..])
}

/// Windows learned per provider and upstream model name (shared by the clones of one
/// [`super::Providers`]).
#[derive(Clone, Default)]
pub struct LearnedWindows {
    inner: Arc<Mutex<HashMap<String, (u32, Instant)>>>,
}

impl LearnedWindows {
    fn key(provider: &str, upstream: &str) -> String {
        format!("{provider}\u{1f}{upstream}")
    }

    /// The window learned for the model, if it is recent.
    pub fn get(&self, provider: &str, upstream: &str) -> Option<u32> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&Self::key(provider, upstream))
            .filter(|(_, at)| at.elapsed() < LEARNED_FOR)
            .map(|(w, _)| *w)
    }

    pub fn learn(&self, provider: &str, upstream: &str, window: u32) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_LEARNED {
            map.clear();
        }
        map.insert(Self::key(provider, upstream), (window, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_stated_by_providers() {
        let cases = [
            // OpenAI (and Azure, OpenRouter)
            ("This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.", Some(8192)),
            // vLLM
            ("This model's maximum context length is 4,096 tokens. However, you requested 5000 tokens (4000 in the messages, 1000 in the completion).", Some(4096)),
            // Anthropic
            ("prompt is too long: 210000 tokens > 200000 maximum", Some(200_000)),
            // Mistral
            ("Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context length", Some(32_768)),
            // llama.cpp: no number
            ("the request exceeds the available context size, try increasing it", None),
            ("context length exceeded", None),
            // a number too small to be a window
            ("maximum context length is 3 tokens", None),
        ];
        for (message, want) in cases {
            assert_eq!(stated_window(message), want, "{message}");
        }
    }

    #[test]
    fn learned_windows_are_per_model_and_bounded() {
        let l = LearnedWindows::default();
        l.learn("p", "a", 4096);
        assert_eq!(l.get("p", "a"), Some(4096));
        assert_eq!(l.get("p", "b"), None);
        assert_eq!(l.get("q", "a"), None);
        for i in 0..MAX_LEARNED {
            l.learn("p", &format!("m{i}"), 1000);
        }
        let held = l.inner.lock().unwrap().len();
        assert!(held <= MAX_LEARNED, "{held}");
    }
}
