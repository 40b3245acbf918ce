//! An example raftwasm guest that is not a cache: a ledger of account
//! balances with transfers that never overdraw.
//!
//! Commands (text, through `POST /apply`):
//! - `open NAME AMOUNT` — opens an account; refused if it exists;
//! - `transfer FROM TO AMOUNT` — moves money; refused if FROM lacks it.
//!
//! Queries (through `POST /query`): `balance NAME`, and `accounts` (every
//! account in name order, one `NAME AMOUNT` per line).

wit_bindgen::generate!({
    world: "state-machine",
    path: "../../../wit",
});

use raftwasm::state_machine::store;

struct Ledger;

const PREFIX: &str = "acct/";

fn key(name: &str) -> Vec<u8> {
    format!("{PREFIX}{name}").into_bytes()
}

fn balance(name: &str) -> Option<u64> {
    store::get(&key(name)).map(|v| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])))
}

fn set_balance(name: &str, amount: u64) {
    store::set(&key(name), &amount.to_le_bytes());
}

fn amount(text: &str) -> Result<u64, String> {
    text.parse().map_err(|_| format!("`{text}` is not an amount"))
}

impl Guest for Ledger {
    fn info() -> GuestInfo {
        GuestInfo {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn apply(_ctx: Context, command: Vec<u8>) -> Result<Vec<u8>, String> {
        let command = String::from_utf8(command).map_err(|_| "commands are text")?;
        match command.split_whitespace().collect::<Vec<_>>()[..] {
            ["open", name, initial] => {
                if balance(name).is_some() {
                    return Err(format!("account {name} already exists"));
                }
                set_balance(name, amount(initial)?);
                Ok(format!("opened {name}").into_bytes())
            }
            ["transfer", from, to, sum] => {
                let sum = amount(sum)?;
                let have = balance(from).ok_or(format!("no account {from}"))?;
                let other = balance(to).ok_or(format!("no account {to}"))?;
                if have < sum {
                    return Err(format!("{from} has {have}, cannot send {sum}"));
                }
                set_balance(from, have - sum);
                set_balance(to, other + sum);
                Ok(format!("{from} {} {to} {}", have - sum, other + sum).into_bytes())
            }
            _ => Err("unknown command; use `open NAME AMOUNT` or `transfer FROM TO AMOUNT`".into()),
        }
    }

    fn query(_ctx: Context, request: Vec<u8>) -> Result<Vec<u8>, String> {
        let request = String::from_utf8(request).map_err(|_| "queries are text")?;
        match request.split_whitespace().collect::<Vec<_>>()[..] {
            ["balance", name] => balance(name)
                .map(|b| b.to_string().into_bytes())
                .ok_or(format!("no account {name}")),
            ["accounts"] => {
                let mut out = String::new();
                for (k, v) in store::scan(PREFIX.as_bytes(), Some(b"acct0"), 1000) {
                    let name = String::from_utf8_lossy(&k[PREFIX.len()..]);
                    let amount = u64::from_le_bytes(v.try_into().unwrap_or([0; 8]));
                    out.push_str(&format!("{name} {amount}\n"));
                }
                Ok(out.into_bytes())
            }
            _ => Err("unknown query; use `balance NAME` or `accounts`".into()),
        }
    }
}

export!(Ledger);
