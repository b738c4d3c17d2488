//! What a caller may see: its tenant's objects, or only those it created (end users whose role
//! does not allow more). Every tenant-facing query takes a [`Scope`], so no handler can forget
//! either filter.

use uuid::Uuid;

/// The tenant, and the creator objects must have (`None`: any in the tenant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub tenant_id: Uuid,
    pub creator: Option<String>,
}

impl Scope {
    /// Everything of one tenant (API keys, workers, tests).
    pub fn tenant(tenant_id: Uuid) -> Scope {
        Scope {
            tenant_id,
            creator: None,
        }
    }

    /// Only what `creator` created in the tenant.
    pub fn creator(tenant_id: Uuid, creator: impl Into<String>) -> Scope {
        Scope {
            tenant_id,
            creator: Some(creator.into()),
        }
    }
}

impl From<Uuid> for Scope {
    fn from(tenant_id: Uuid) -> Scope {
        Scope::tenant(tenant_id)
    }
}

impl From<&Scope> for Scope {
    fn from(s: &Scope) -> Scope {
        s.clone()
    }
}
