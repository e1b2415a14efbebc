//! Which process holds which socket, read from `/proc/<pid>/fd`, where a socket shows as a
//! link to `socket:[<inode>]`: a worker's connections, the socket a restarted daemon takes
//! from a worker, and the processes behind a foreign socket on a service's address.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use super::LISTEN_FD;
use crate::ownership::Holder;

/// The inode of the socket a `/proc/<pid>/fd/<n>` link points to; `None` for anything else.
fn socket_inode(target: &Path) -> Option<u32> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The sockets process `pid` holds (`/proc/<pid>/fd`), as (descriptor, inode).
fn socket_fds(pid: u32) -> io::Result<Vec<(i32, u32)>> {
    let mut held = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let fd = fd?;
        // A descriptor closed while listing is simply not counted.
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let number = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
        if let (Some(number), Some(inode)) = (number, socket_inode(&target)) {
            held.push((number, inode));
        }
    }
    Ok(held)
}

/// The inodes of the sockets process `pid` holds (`/proc/<pid>/fd`).
pub fn held_sockets(pid: u32) -> io::Result<BTreeSet<u32>> {
    Ok(socket_fds(pid)?
        .into_iter()
        .map(|(_, inode)| inode)
        .collect())
}

/// A copy of the socket whose cookie is `cookie` among those the process behind `pidfd`
/// (pid `pid`) holds, taken with `pidfd_getfd`: how a restarted daemon reaches a worker's
/// listening socket, the only handle on its reuseport group. `None` if it holds no such
/// socket.
pub fn socket_of(pidfd: BorrowedFd<'_>, pid: u32, cookie: u64) -> io::Result<Option<OwnedFd>> {
    let mut sockets = socket_fds(pid)?;
    // Where socket activation put it first: a worker holding many connections is not
    // searched through.
    sockets.sort_by_key(|&(number, _)| number != LISTEN_FD);
    for (number, _) in sockets {
        // A descriptor closed meanwhile is simply skipped.
        let Ok(copy) =
            rustix::process::pidfd_getfd(pidfd, number, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        if crate::socket::cookie(copy.as_fd()).ok() == Some(cookie) {
            return Ok(Some(copy));
        }
    }
    Ok(None)
}

/// A copy of a socket of the reuseport group of `proto` on `addr` (see
/// [`crate::socket::is_member_of`]) among those the process behind `pidfd` (pid `pid`)
/// holds, looked for first at `fd`, where socket activation put it: how a restarted daemon
/// reaches the group of a service's second, third or fourth listener, whose sockets' cookies
/// no slot records. `None` if it holds none.
pub fn member_socket_of(
    pidfd: BorrowedFd<'_>,
    pid: u32,
    fd: i32,
    proto: crate::socket::Proto,
    addr: std::net::SocketAddr,
) -> io::Result<Option<OwnedFd>> {
    let mut sockets = socket_fds(pid)?;
    sockets.sort_by_key(|&(number, _)| number != fd);
    for (number, _) in sockets {
        // A descriptor closed meanwhile is simply skipped.
        let Ok(copy) =
            rustix::process::pidfd_getfd(pidfd, number, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        if crate::socket::is_member_of(copy.as_fd(), proto, addr) {
            return Ok(Some(copy));
        }
    }
    Ok(None)
}

/// How many of `established` (connection inodes, see
/// [`crate::sockdiag::SockDiag::established_inodes`]) the process `pid` holds.
pub fn established_connections(pid: u32, established: &BTreeSet<u32>) -> io::Result<usize> {
    Ok(held_sockets(pid)?.intersection(established).count())
}

/// The pids (of this pid namespace) holding each socket of `inodes`, found in one pass over
/// every process's descriptors; a socket nobody holds is left out. Processes that end, or
/// whose descriptors cannot be read, while the pass goes on are skipped. Fails only if
/// `/proc` itself cannot be listed.
pub fn socket_holders(inodes: &BTreeSet<u32>) -> io::Result<BTreeMap<u32, Vec<u32>>> {
    let mut holders: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry
            .ok()
            .and_then(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(held) = socket_fds(pid) else {
            continue;
        };
        let held: BTreeSet<u32> = held.into_iter().map(|(_, inode)| inode).collect();
        for inode in held.intersection(inodes) {
            holders.entry(*inode).or_default().push(pid);
        }
    }
    Ok(holders)
}

/// Process `pid` as an operator would look for it: its command name and its parent's
/// (unless the parent is init, or gone). A process that ended is named `?`.
pub fn holder(pid: u32) -> Holder {
    let stat = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let (name, parent) = stat(pid)
        .as_deref()
        .and_then(parse_name_and_parent)
        .unwrap_or_else(|| ("?".to_owned(), 0));
    let parent = (parent > 1)
        .then(|| {
            let name = stat(parent).as_deref().and_then(parse_name_and_parent)?.0;
            Some((parent, name))
        })
        .flatten();
    Holder { pid, name, parent }
}

/// The command name (field 2) and parent pid (field 4) of a `/proc/<pid>/stat` line; the
/// name may hold spaces and parentheses, so it ends at the line's last `)`.
fn parse_name_and_parent(stat: &str) -> Option<(String, u32)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    let parent = rest.split_whitespace().nth(1)?.parse().ok()?;
    Some((name.to_owned(), parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_holds_its_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _server = listener.accept().unwrap();
        assert_eq!(
            established_connections(
                std::process::id(),
                &crate::sockdiag::SockDiag::open()
                    .unwrap()
                    .established_inodes(port)
                    .unwrap()
            )
            .unwrap(),
            1
        );
    }

    #[test]
    fn a_socket_is_found_with_the_process_holding_it() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = std::process::id();
        let inodes = held_sockets(me).unwrap();
        let holders = socket_holders(&inodes).unwrap();
        assert!(
            holders.values().all(|pids| pids.contains(&me)),
            "{holders:?}"
        );
        assert_eq!(holders.len(), inodes.len());
        assert!(
            socket_holders(&BTreeSet::from([u32::MAX]))
                .unwrap()
                .is_empty()
        );
        drop(socket);
        let named = holder(me);
        assert_eq!(named.pid, me);
        assert!(!named.name.is_empty() && named.name != "?", "{named:?}");
        assert_eq!(holder(u32::MAX).name, "?");
    }

    #[test]
    fn stat_lines_give_the_name_and_parent_even_with_odd_names() {
        assert_eq!(
            parse_name_and_parent("42 (a) b (c)) S 7 42 42 0 -1"),
            Some(("a) b (c)".to_owned(), 7))
        );
        assert_eq!(parse_name_and_parent("garbage"), None);
    }
}
