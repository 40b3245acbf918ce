//! A guest whose name is hostile to text formats: it holds double quotes,
//! backslashes and a backslash followed by `n`, which a careless escaper
//! turns into a newline. `apply` and `query` answer the command back.
//!
//! The tests also make a variant whose name holds a real newline, by
//! replacing the `#` of [`NAME`] in the built module (the name is a string
//! constant in the module's data, so a same-length edit changes nothing
//! else).

wit_bindgen::generate!({
    world: "state-machine",
    path: "../../../wit",
});

/// The name `info` returns; the tests keep a copy of it.
const NAME: &str = "odd \"name\" C:\\new\\ #";

struct OddName;

impl Guest for OddName {
    fn info() -> GuestInfo {
        GuestInfo {
            name: NAME.into(),
            version: "0.1.0".into(),
        }
    }

    fn apply(_ctx: Context, command: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(command)
    }

    fn query(_ctx: Context, request: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(request)
    }
}

export!(OddName);
