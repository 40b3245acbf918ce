//! openraft's storage conformance suite on the sled log store and state
//! machine.

use raftwasm::raft::disk::Disk;
use raftwasm::raft::log_store::LogStore;
use raftwasm::raft::state_machine::StateMachineStore;
use raftwasm::raft::{TypeConfig, typ};
use raftwasm::runtime::{GuestRuntime, Limits};

struct SledBuilder {
    runtime: GuestRuntime,
}

impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), typ::StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = Disk::open(&dir.path().join("db")).expect("sled opens");
        let log = LogStore::open(&disk)?;
        let sm =
            StateMachineStore::open(&disk, &dir.path().join("snapshots"), self.runtime.clone())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_stores_pass_the_openraft_suite() -> Result<(), typ::StorageError> {
    let runtime = GuestRuntime::new(Limits::default(), None).expect("engine");
    openraft::testing::Suite::test_all(SledBuilder { runtime })
}
