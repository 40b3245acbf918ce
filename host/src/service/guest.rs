//! Guests: a deploy is validated on the leader before anything is
//! replicated, then goes through the log in two entries: `StageGuest`
//! (every replica stores the module and compiles it in the background) and
//! `ActivateGuest` (every replica switches at that entry's index, running
//! the migration hook).

use super::{Node, ServiceError};
use crate::proto::{GuestHistory, SwapRecord};
use crate::raft::{Op, OpOutput};

impl Node {
    /// Validates `module`, then stages and activates it through the log;
    /// `force` skips the version guard (same name, higher version).
    ///
    /// # Errors
    /// [`ServiceError::NotLeader`] on a follower;
    /// [`ServiceError::BadRequest`] for a module that is not a usable guest
    /// or whose name holds a control character; [`ServiceError::Unavailable`]
    /// when this node cannot load it now (see
    /// [`crate::runtime::LoadError::is_module_property`]);
    /// [`ServiceError::Conflict`] when the version guard refuses it;
    /// [`ServiceError::Refused`] when activation fails on the cluster (a
    /// failed migration); and the write errors of the batcher.
    pub async fn deploy(&self, module: Vec<u8>, force: bool) -> Result<SwapRecord, ServiceError> {
        if !self.is_leader() {
            return Err(self.not_leader("not the leader; guests are deployed through the leader"));
        }
        let limit = self.runtime.limits().module_bytes;
        if module.len() > limit {
            return Err(ServiceError::TooLarge(format!(
                "the module is {} bytes; the limit is {limit}",
                module.len()
            )));
        }
        let runtime = self.runtime.clone();
        let bytes = module.clone();
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&bytes))
            .await
            .map_err(|e| ServiceError::Internal(format!("validating the module: {e}")))?
            .map_err(|e| {
                if e.is_module_property() {
                    ServiceError::BadRequest(e.to_string())
                } else {
                    ServiceError::Unavailable(e.to_string())
                }
            })?;
        // Checked here, before anything is replicated, and not when a
        // replica loads a module: a guest already in some log keeps loading
        // as before.
        if let Some(c) = loaded.name().chars().find(|c| c.is_control()) {
            return Err(ServiceError::BadRequest(format!(
                "the guest's name {:?} contains the control character {c:?}; a name may hold any text but control characters (newlines, tabs, escapes)",
                loaded.name()
            )));
        }
        if !force
            && let Some(active) = self.state.active()
            && let Err(refusal) = loaded.may_replace(&active.module)
        {
            return Err(ServiceError::Conflict(
                format!("{refusal} (force=true)").into_bytes(),
            ));
        }

        let hash = match self.batcher.write(Op::StageGuest { module }).await? {
            Ok(OpOutput::Staged(hash)) => hash,
            Ok(other) => {
                return Err(ServiceError::Internal(format!(
                    "staging a guest was answered with {other:?}"
                )));
            }
            Err(refusal) => return Err(ServiceError::Refused(refusal)),
        };
        match self
            .batcher
            .write(Op::ActivateGuest { hash, force })
            .await?
        {
            Ok(OpOutput::Activated(record)) => Ok(record),
            Ok(other) => Err(ServiceError::Internal(format!(
                "activating a guest was answered with {other:?}"
            ))),
            Err(refusal) => Err(ServiceError::Refused(refusal)),
        }
    }

    /// The active guest and every swap so far.
    ///
    /// # Errors
    /// [`ServiceError::Internal`] when the history cannot be read.
    pub fn guest_history(&self) -> Result<GuestHistory, ServiceError> {
        let history = self
            .state
            .guest_history()
            .map_err(|e| ServiceError::Internal(format!("reading the guest history: {e}")))?;
        Ok(GuestHistory {
            active: self.state.active().map(|g| g.describe()),
            history,
        })
    }
}
