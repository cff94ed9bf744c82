//! The authenticated organization a request acts for, as the key cache and
//! the lease table hold it. Built once per verification or re-read (from the
//! key's row, on a query or verifier thread), then shared by `Rc` on the
//! shard. Its text fields live in one allocation, so a request that reads
//! them (`GET /api/keys`) touches a line or two of memory, not six strings
//! scattered over the heap: with thousands of keys cached that is the
//! difference between cache hits and misses.

/// The fields, as read from the database.
pub struct PrincipalFields {
    pub organization_id: uuid::Uuid,
    pub organization_name: String,
    pub tier: String,
    pub key_id: String,
    pub created_at: String,
    pub updated_at: String,
    pub webhook_url: Option<String>,
}

/// An authenticated organization, as requests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub organization_id: uuid::Uuid,
    /// key id, name, tier, created, updated and webhook URL, back to back.
    text: Box<str>,
    /// Where each of those ends in `text`.
    ends: [u32; 6],
    has_webhook: bool,
}

impl From<PrincipalFields> for Principal {
    fn from(f: PrincipalFields) -> Principal {
        let webhook = f.webhook_url.as_deref();
        let parts = [
            f.key_id.as_str(),
            f.organization_name.as_str(),
            f.tier.as_str(),
            f.created_at.as_str(),
            f.updated_at.as_str(),
            webhook.unwrap_or(""),
        ];
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut ends = [0u32; 6];
        for (end, part) in ends.iter_mut().zip(parts) {
            text.push_str(part);
            // Database text fields are far below 4 GiB (names are at most
            // 255 characters, URLs are bounded by the webhook route).
            *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        Principal {
            organization_id: f.organization_id,
            text: text.into_boxed_str(),
            ends,
            has_webhook: webhook.is_some(),
        }
    }
}

impl Principal {
    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize).unwrap_or("")
    }

    pub fn key_id(&self) -> &str {
        self.part(0)
    }

    pub fn organization_name(&self) -> &str {
        self.part(1)
    }

    pub fn tier(&self) -> &str {
        self.part(2)
    }

    pub fn created_at(&self) -> &str {
        self.part(3)
    }

    pub fn updated_at(&self) -> &str {
        self.part(4)
    }

    pub fn webhook_url(&self) -> Option<&str> {
        self.has_webhook.then(|| self.part(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_through_one_allocation() {
        let org = uuid::Uuid::new_v4();
        let p = Principal::from(PrincipalFields {
            organization_id: org,
            organization_name: "Acmé \"quoted\"".into(),
            tier: "pro".into(),
            key_id: "AB3kx9Zq01Lm".into(),
            created_at: "2026-11-27T10:00:00.000000Z".into(),
            updated_at: "2026-11-27T11:00:00.000000Z".into(),
            webhook_url: Some("https://example.com/hook".into()),
        });
        assert_eq!(p.organization_id, org);
        assert_eq!(p.key_id(), "AB3kx9Zq01Lm");
        assert_eq!(p.organization_name(), "Acmé \"quoted\"");
        assert_eq!(p.tier(), "pro");
        assert_eq!(p.created_at(), "2026-11-27T10:00:00.000000Z");
        assert_eq!(p.updated_at(), "2026-11-27T11:00:00.000000Z");
        assert_eq!(p.webhook_url(), Some("https://example.com/hook"));
        // No webhook and an empty one are told apart.
        let none = Principal::from(PrincipalFields {
            organization_id: org,
            organization_name: "o".into(),
            tier: "free".into(),
            key_id: "k".into(),
            created_at: String::new(),
            updated_at: String::new(),
            webhook_url: None,
        });
        assert_eq!(none.webhook_url(), None);
        assert_eq!(none.created_at(), "");
        assert_eq!(none.tier(), "free");
    }
}
