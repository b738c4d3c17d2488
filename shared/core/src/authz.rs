//! Authorization: roles, the permissions each grants, and API-key scopes (a key's permissions
//! are its role's, narrowed to its scopes when it has any). Which route needs which permission
//! is declared in one table in the API (`api/src/authz.rs`).

use serde::{Deserialize, Serialize};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Permission {
    /// Read jobs and their events (REST, WebSocket, SSE).
    #[serde(rename = "jobs:read")]
    JobsRead,
    /// Submit and cancel jobs (including `/v1/chat/completions`).
    #[serde(rename = "jobs:write")]
    JobsWrite,
    #[serde(rename = "conversations:read")]
    ConversationsRead,
    /// Create, post to and delete conversations.
    #[serde(rename = "conversations:write")]
    ConversationsWrite,
    #[serde(rename = "models:read")]
    ModelsRead,
    #[serde(rename = "usage:read")]
    UsageRead,
    /// Create, list and revoke the tenant's API keys.
    #[serde(rename = "keys:manage")]
    KeysManage,
    /// Read the tenant's audit trail.
    #[serde(rename = "audit:read")]
    AuditRead,
}

impl Permission {
    pub const ALL: &'static [Permission] = &[
        Permission::JobsRead,
        Permission::JobsWrite,
        Permission::ConversationsRead,
        Permission::ConversationsWrite,
        Permission::ModelsRead,
        Permission::UsageRead,
        Permission::KeysManage,
        Permission::AuditRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::JobsRead => "jobs:read",
            Permission::JobsWrite => "jobs:write",
            Permission::ConversationsRead => "conversations:read",
            Permission::ConversationsWrite => "conversations:write",
            Permission::ModelsRead => "models:read",
            Permission::UsageRead => "usage:read",
            Permission::KeysManage => "keys:manage",
            Permission::AuditRead => "audit:read",
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.iter().copied().find(|p| p.as_str() == s)
    }
}

/// A caller's role within its tenant.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads jobs, conversations, models and usage.
    Viewer,
    /// A viewer that also submits and cancels jobs and writes conversations.
    Developer,
    /// A developer that also manages API keys and reads the audit trail.
    Admin,
    /// Everything in the tenant.
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Viewer, Role::Developer, Role::Admin, Role::Owner]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    /// What the role may do.
    pub fn grants(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Viewer => matches!(p, JobsRead | ConversationsRead | ModelsRead | UsageRead),
            Role::Developer => {
                Role::Viewer.grants(p) || matches!(p, JobsWrite | ConversationsWrite)
            }
            Role::Admin | Role::Owner => true,
        }
    }
}

/// Whether a caller with `role` and optional `scopes` has `p`.
pub fn allows(role: Role, scopes: Option<&[Permission]>, p: Permission) -> bool {
    role.grants(p) && scopes.is_none_or(|s| s.contains(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest_and_scopes_narrow() {
        for p in Permission::ALL {
            if Role::Viewer.grants(*p) {
                assert!(Role::Developer.grants(*p));
            }
            if Role::Developer.grants(*p) {
                assert!(Role::Admin.grants(*p));
            }
            assert!(Role::Owner.grants(*p));
        }
        assert!(!Role::Viewer.grants(Permission::JobsWrite));
        assert!(!Role::Developer.grants(Permission::KeysManage));
        let only_read = [Permission::JobsRead];
        assert!(allows(Role::Owner, Some(&only_read), Permission::JobsRead));
        assert!(!allows(
            Role::Owner,
            Some(&only_read),
            Permission::JobsWrite
        ));
        // a scope never adds what the role lacks
        assert!(!allows(
            Role::Viewer,
            Some(&[Permission::KeysManage]),
            Permission::KeysManage
        ));
        assert_eq!(Permission::parse("jobs:write"), Some(Permission::JobsWrite));
        assert_eq!(Role::parse("admin"), Some(Role::Admin));
    }
}
