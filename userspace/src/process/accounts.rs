//! Whom a worker runs as, resolved through the system's user database (`nix`, which
//! wraps the reentrant `getpw*_r`/`getgr*_r` and `getgrouplist`, growing its buffers as
//! needed: a user in any number of groups gets all of them).
use nix::unistd::{Gid, Group, Uid, User};

use super::{ProcessError, os};

/// Whom a worker runs as: resolved from the config's `user` and `group` when the daemon
/// starts, applied in the child between fork and exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary groups: the user's, as `/etc/group` lists them, with `gid` among them.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Resolves `user` (a name or a uid) and `group` (a name or a gid; `None` for the user's
    /// primary group) through the system's user database.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<Self, ProcessError> {
        let missing = |kind, name: &str| ProcessError::NoSuchAccount {
            kind,
            name: name.to_owned(),
        };
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        }
        .map_err(|e| os(format!("looking up user {user:?}"))(e.into()))?;
        let (uid, primary, account) = match (found, user.parse::<u32>()) {
            (Some(account), _) => (account.uid.as_raw(), account.gid.as_raw(), Some(account)),
            // A bare uid with no passwd entry is allowed when the group is given.
            (None, Ok(uid)) if group.is_some() => (uid, u32::MAX, None),
            (None, _) => return Err(missing("user", user)),
        };
        let gid = match group {
            None => primary,
            Some(group) => {
                let found = match group.parse::<u32>() {
                    Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
                    Err(_) => Group::from_name(group),
                }
                .map_err(|e| os(format!("looking up group {group:?}"))(e.into()))?;
                match (found, group.parse::<u32>()) {
                    (Some(found), _) => found.gid.as_raw(),
                    (None, Ok(gid)) => gid,
                    (None, Err(_)) => return Err(missing("group", group)),
                }
            }
        };
        let mut groups = match account {
            Some(account) => {
                let name = std::ffi::CString::new(account.name.as_str())
                    .map_err(|_| missing("user", user))?;
                nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                    .map_err(|e| {
                        os(format!("listing the groups of user {:?}", account.name))(e.into())
                    })?
                    .into_iter()
                    .map(Gid::as_raw)
                    .collect()
            }
            None => Vec::new(),
        };
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        Ok(Self { uid, gid, groups })
    }
}
