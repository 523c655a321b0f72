//! Detection classes: the `detect` filter's share of the audit scan.
//!
//! Falco's k8s_audit rules, once specialised for an event's (stage, verb, resource,
//! subresource), mostly read a few fields with few distinct values in a cluster: the user, the
//! impersonated user, the namespace, the authorization decision, the response code. Events equal
//! in all of these (a *class*) fire the same of those rules, so the `detect` filter decides a
//! class once, in Python, on one of its events, and every other event of the class costs it
//! nothing (an event of a class that fires nothing never becomes a Python object).
//!
//! The scan already decodes exactly these members of every event (the `Event` struct in
//! lib.rs, the mirror of the Python filter's msgspec struct), so the class is found here: each
//! NATIVE line gets a class id, stable for the scanner's life. The table is bounded: past
//! `MAX_CLASSES` a new class gets `NO_CLASS` and its events are decided one by one in Python
//! (slower, same result). What a class is made of is given back by `AuditScanner.class_values`,
//! in `CLASS_FIELDS` order, so Python can check it against its own decoding of the event.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use crate::Event;

/// A line with no class (not a NATIVE event, or the table was full).
pub(crate) const NO_CLASS: u32 = u32::MAX;
/// At most this many classes per scanner (a few hundred in a real cluster).
const MAX_CLASSES: usize = 20_000;

/// stage, verb, resource, subresource, user name, impersonated user name, namespace,
/// authorization decision (strings), then the response code (an integer) and whether the
/// event has a request object and a response object (rules on pods read into them).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClassKey<'a> {
    texts: [Option<Cow<'a, str>>; 8],
    code: Option<i64>,
    objects: (bool, bool),
}

impl<'a> ClassKey<'a> {
    pub(crate) fn of(ev: &Event<'a>) -> ClassKey<'a> {
        let text = |value: Option<&crate::JStr<'a>>| value.map(|v| v.0.clone());
        let oref = ev.object_ref.as_ref();
        ClassKey {
            texts: [
                text(ev.stage.as_ref()),
                text(ev.verb.as_ref()),
                text(oref.and_then(|r| r.resource.as_ref())),
                text(oref.and_then(|r| r.subresource.as_ref())),
                text(ev.user.as_ref().and_then(|u| u.username.as_ref())),
                text(
                    ev.impersonated_user
                        .as_ref()
                        .and_then(|u| u.username.as_ref()),
                ),
                text(oref.and_then(|r| r.namespace.as_ref())),
                text(ev.annotations.as_ref().and_then(|n| n.decision.as_ref())),
            ],
            code: ev.response_status.as_ref().and_then(|s| s.code),
            objects: (ev.request_object.is_some(), ev.response_object.is_some()),
        }
    }

    fn owned(&self) -> ClassKey<'static> {
        ClassKey {
            texts: self
                .texts
                .clone()
                .map(|t| t.map(|t| Cow::Owned(t.into_owned()))),
            code: self.code,
            objects: self.objects,
        }
    }

    pub(crate) fn texts(&self) -> &[Option<Cow<'a, str>>; 8] {
        &self.texts
    }

    pub(crate) fn code(&self) -> Option<i64> {
        self.code
    }

    pub(crate) fn objects(&self) -> (bool, bool) {
        self.objects
    }
}

/// One scan part's classes: ids local to the part, resolved to the table's by `ClassTable::merge`.
#[derive(Default)]
pub(crate) struct LocalClasses<'a> {
    ids: HashMap<ClassKey<'a>, u32>,
    keys: Vec<ClassKey<'a>>,
}

impl<'a> LocalClasses<'a> {
    pub(crate) fn id(&mut self, key: ClassKey<'a>) -> u32 {
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = self.keys.len() as u32;
        self.keys.push(key.clone());
        self.ids.insert(key, id);
        id
    }
}

/// The scanner's classes, shared by its scans (and their threads, after each part is done).
#[derive(Default)]
pub(crate) struct ClassTable {
    inner: Mutex<TableInner>,
}

#[derive(Default)]
struct TableInner {
    ids: HashMap<ClassKey<'static>, u32>,
    keys: Vec<ClassKey<'static>>,
}

impl ClassTable {
    /// Turns a part's local ids (in ``ids``, NO_CLASS kept) into the table's.
    pub(crate) fn merge(&self, local: &LocalClasses, ids: &mut [u32]) {
        if local.keys.is_empty() {
            return;
        }
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let global: Vec<u32> = local
            .keys
            .iter()
            .map(|key| {
                if let Some(&id) = table.ids.get(key) {
                    return id;
                }
                if table.keys.len() >= MAX_CLASSES {
                    return NO_CLASS;
                }
                let id = table.keys.len() as u32;
                let owned = key.owned();
                table.keys.push(owned.clone());
                table.ids.insert(owned, id);
                id
            })
            .collect();
        for id in ids.iter_mut() {
            if *id != NO_CLASS {
                *id = global[*id as usize];
            }
        }
    }

    /// The class's key (a copy), None for an id the table does not have.
    pub(crate) fn get(&self, id: u32) -> Option<ClassKey<'static>> {
        let table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        table.keys.get(id as usize).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .len()
    }
}

/// Each distinct class id in ``ids`` (native-endian u32s, as ``AuditScan.class_ids`` gives
/// them) with how many lines have it, in order of first appearance: the ``detect`` filter
/// decides per class, not per line.
#[pyo3::pyfunction]
pub(crate) fn class_counts(ids: &[u8]) -> pyo3::PyResult<Vec<(u32, usize)>> {
    let mut order: Vec<(u32, usize)> = Vec::new();
    let mut at: HashMap<u32, usize> = HashMap::new();
    for id in decode_ids(ids)? {
        match at.get(&id) {
            Some(&i) => order[i].1 += 1,
            None => {
                at.insert(id, order.len());
                order.push((id, 1));
            }
        }
    }
    Ok(order)
}

/// The numbers of the lines whose class id is in ``wanted``, in order.
#[pyo3::pyfunction]
pub(crate) fn lines_of(ids: &[u8], wanted: Vec<u32>) -> pyo3::PyResult<Vec<usize>> {
    let wanted: std::collections::HashSet<u32> = wanted.into_iter().collect();
    Ok(decode_ids(ids)?
        .enumerate()
        .filter(|(_, id)| wanted.contains(id))
        .map(|(line, _)| line)
        .collect())
}

fn decode_ids(ids: &[u8]) -> pyo3::PyResult<impl Iterator<Item = u32> + '_> {
    if ids.len() % 4 != 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "class ids are 4 bytes each",
        ));
    }
    Ok(ids
        .chunks_exact(4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
}
