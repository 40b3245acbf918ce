//! openraft's storage conformance suite on the log store (the log file and
//! its records in sled) and the state machine.

use raftwasm::raft::disk::Disk;
use raftwasm::raft::log_file::LogSync;
use raftwasm::raft::log_store::LogStore;
use raftwasm::raft::state_machine::StateMachineStore;
use raftwasm::raft::{TypeConfig, typ};
use raftwasm::runtime::{GuestRuntime, Limits};

struct DiskBuilder {
    runtime: GuestRuntime,
}

impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir>
    for DiskBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), typ::StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = Disk::open(&dir.path().join("db")).expect("sled opens");
        let log = LogStore::open(&disk, &dir.path().join("log"), LogSync::Range)?;
        let sm =
            StateMachineStore::open(&disk, &dir.path().join("snapshots"), self.runtime.clone())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn stores_pass_the_openraft_suite() -> Result<(), typ::StorageError> {
    let runtime = GuestRuntime::new(Limits::default(), None).expect("engine");
    openraft::testing::Suite::test_all(DiskBuilder { runtime })
}
