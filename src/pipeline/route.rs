//! soketi's endpoint filter: `channel_name_starts_with` and
//! `channel_name_ends_with`; when both are set, both must match.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelFilter {
    pub starts_with: Option<String>,
    pub ends_with: Option<String>,
}

impl ChannelFilter {
    /// An event without a channel matches only a filter that asks nothing.
    pub fn matches(&self, channel: Option<&str>) -> bool {
        if self.starts_with.is_none() && self.ends_with.is_none() {
            return true;
        }
        let Some(channel) = channel else { return false };
        self.starts_with
            .as_deref()
            .is_none_or(|p| channel.starts_with(p))
            && self
                .ends_with
                .as_deref()
                .is_none_or(|s| channel.ends_with(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(start: Option<&str>, end: Option<&str>) -> ChannelFilter {
        ChannelFilter {
            starts_with: start.map(Into::into),
            ends_with: end.map(Into::into),
        }
    }

    #[test]
    fn no_filter_takes_everything() {
        assert!(f(None, None).matches(Some("anything")));
        assert!(f(None, None).matches(None));
    }

    #[test]
    fn prefix_and_suffix_must_both_match() {
        let both = f(Some("private-"), Some("-orders"));
        assert!(both.matches(Some("private-eu-orders")));
        assert!(!both.matches(Some("private-eu-users")));
        assert!(!both.matches(Some("public-orders")));
        assert!(f(Some("private-"), None).matches(Some("private-x")));
        assert!(!f(Some("private-"), None).matches(Some("presence-x")));
        assert!(f(None, Some("-orders")).matches(Some("x-orders")));
    }

    #[test]
    fn a_filter_never_matches_an_event_without_channel() {
        assert!(!f(Some(""), None).matches(None));
    }
}
