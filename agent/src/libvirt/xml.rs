//! The XML shear reads from and gives to libvirt: the domain (`virsh
//! dumpxml`: its name, UUID and disks; adapted for a restore), the pull-mode
//! backup (`<domainbackup>`) and the checkpoint (`<domaincheckpoint>`).
//!
//! A small element tree over quick-xml: parse, look up, change, write back.
//! Comments, processing instructions and the declaration are dropped;
//! everything else (elements, attributes in order, text) is kept.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use quick_xml::events::Event;

use super::LibvirtError;

/// An element: its name, attributes (in document order) and children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Tag name.
    pub name: String,
    /// `(name, value)` pairs, unescaped.
    pub attrs: Vec<(String, String)>,
    /// Child nodes.
    pub children: Vec<Node>,
}

/// A child node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An element.
    Element(Element),
    /// Text, unescaped.
    Text(String),
}

impl Element {
    fn new(name: &str) -> Element {
        Element {
            name: name.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Set (or add) attribute `name`.
    pub fn set_attr(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.into(),
            None => self.attrs.push((name.into(), value.into())),
        }
    }

    fn remove_attr(&mut self, name: &str) {
        self.attrs.retain(|(k, _)| k != name);
    }

    /// The first child element called `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find_map(|n| match n {
            Node::Element(e) if e.name == name => Some(e),
            _ => None,
        })
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The element's text (its text children joined), trimmed.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s.trim().to_string()
    }

    fn set_text(&mut self, text: &str) {
        self.children = vec![Node::Text(text.into())];
    }

    /// Remove every child element called `name`.
    fn remove_children(&mut self, name: &str) {
        self.children
            .retain(|n| !matches!(n, Node::Element(e) if e.name == name));
    }

    /// Serialise (no declaration).
    pub fn to_xml(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        s
    }

    fn write(&self, s: &mut String) {
        s.push('<');
        s.push_str(&self.name);
        for (k, v) in &self.attrs {
            let _ = write!(s, " {k}=\"{}\"", escape(v));
        }
        if self.children.is_empty() {
            s.push_str("/>");
            return;
        }
        s.push('>');
        for n in &self.children {
            match n {
                Node::Element(e) => e.write(s),
                Node::Text(t) => s.push_str(&escape(t)),
            }
        }
        let _ = write!(s, "</{}>", self.name);
    }
}

/// Escape text or an attribute value.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

fn bad(why: impl Into<String>) -> LibvirtError {
    LibvirtError::Xml(why.into())
}

fn start_element(e: &quick_xml::events::BytesStart<'_>) -> Result<Element, LibvirtError> {
    let name = String::from_utf8(e.name().as_ref().to_vec()).map_err(|_| bad("tag not UTF-8"))?;
    let mut el = Element::new(&name);
    for a in e.attributes() {
        let a = a.map_err(|e| bad(format!("attribute of <{name}>: {e}")))?;
        let k = String::from_utf8(a.key.as_ref().to_vec()).map_err(|_| bad("attr not UTF-8"))?;
        let v = a
            .unescape_value()
            .map_err(|e| bad(format!("attribute {k} of <{name}>: {e}")))?;
        el.attrs.push((k, v.into_owned()));
    }
    Ok(el)
}

/// Parse a document into its root element.
pub fn parse(xml: &str) -> Result<Element, LibvirtError> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let push_text = |stack: &mut Vec<Element>, t: String| {
        if let Some(top) = stack.last_mut() {
            match top.children.last_mut() {
                Some(Node::Text(prev)) => prev.push_str(&t),
                _ => top.children.push(Node::Text(t)),
            }
        }
    };
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| bad(format!("at byte {}: {e}", reader.buffer_position())))?;
        match ev {
            Event::Start(e) => stack.push(start_element(&e)?),
            Event::Empty(e) => {
                let el = start_element(&e)?;
                match stack.last_mut() {
                    Some(top) => top.children.push(Node::Element(el)),
                    None if root.is_none() => root = Some(el),
                    None => return Err(bad("more than one root element")),
                }
            }
            Event::End(_) => {
                let el = stack.pop().ok_or_else(|| bad("unbalanced end tag"))?;
                match stack.last_mut() {
                    Some(top) => top.children.push(Node::Element(el)),
                    None if root.is_none() => root = Some(el),
                    None => return Err(bad("more than one root element")),
                }
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| bad(format!("text: {e}")))?;
                push_text(&mut stack, s.into_owned());
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| bad(format!("CDATA: {e}")))?;
                push_text(&mut stack, s.into_owned());
            }
            Event::GeneralRef(r) => {
                let c = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .map_err(|e| bad(format!("character reference: {e}")))?
                } else {
                    match r
                        .decode()
                        .map_err(|e| bad(format!("entity: {e}")))?
                        .as_ref()
                    {
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "amp" => Some('&'),
                        "quot" => Some('"'),
                        "apos" => Some('\''),
                        other => return Err(bad(format!("unknown entity &{other};"))),
                    }
                };
                if let Some(c) = c {
                    push_text(&mut stack, c.to_string());
                }
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(bad("unclosed element at the end of the document"));
    }
    root.ok_or_else(|| bad("no root element"))
}

/// One disk of a domain, as its XML says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// `<target dev>`: the disk's name in libvirt and in the backup (`vda`).
    pub target: String,
    /// `<disk type>`: `file`, `block`, `network`, `volume`.
    pub kind: String,
    /// `<disk device>`: `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// The image (`<source file>` or `<source dev>`), if local.
    pub source: Option<String>,
    /// `<driver type>` (`qcow2`, `raw`).
    pub format: Option<String>,
    /// `<readonly/>`.
    pub read_only: bool,
}

impl DomainDisk {
    /// Whether shear backs this disk up: a writable disk (CD-ROMs,
    /// floppies and read-only disks are not, as vzdump skips CD-ROMs).
    pub fn backed_up(&self) -> bool {
        matches!(self.device.as_str(), "disk" | "lun") && !self.read_only
    }
}

/// What shear needs of a domain's XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: String,
    /// The disks, in XML order.
    pub disks: Vec<DomainDisk>,
}

/// Parse a domain XML (`virsh dumpxml`).
pub fn parse_domain(xml: &str) -> Result<DomainInfo, LibvirtError> {
    let root = parse(xml)?;
    if root.name != "domain" {
        return Err(bad(format!(
            "root element is <{}>, not <domain>",
            root.name
        )));
    }
    let name = root
        .child("name")
        .map(Element::text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("the domain has no <name>"))?;
    let uuid = root.child("uuid").map(Element::text).unwrap_or_default();
    let mut disks = Vec::new();
    if let Some(devices) = root.child("devices") {
        for d in devices.elements().filter(|e| e.name == "disk") {
            let target = d
                .child("target")
                .and_then(|t| t.attr("dev"))
                .ok_or_else(|| bad(format!("a <disk> of domain {name} has no <target dev>")))?;
            let source = d
                .child("source")
                .and_then(|s| s.attr("file").or_else(|| s.attr("dev")))
                .map(str::to_string);
            disks.push(DomainDisk {
                target: target.to_string(),
                kind: d.attr("type").unwrap_or("file").to_string(),
                device: d.attr("device").unwrap_or("disk").to_string(),
                source,
                format: d
                    .child("driver")
                    .and_then(|x| x.attr("type"))
                    .map(str::to_string),
                read_only: d.child("readonly").is_some(),
            });
        }
    }
    Ok(DomainInfo { name, uuid, disks })
}

/// One disk of a pull-mode backup.
#[derive(Debug, Clone)]
pub struct BackupDisk {
    /// Target name (`vda`).
    pub target: String,
    /// The scratch (fleece) file libvirt creates for it.
    pub scratch: PathBuf,
}

/// The `<domainbackup>` of a pull-mode backup: an NBD server on the unix
/// socket `socket`, the listed disks with their scratch files (every other
/// disk of `all_targets` excluded), incremental from `incremental` when
/// given.
pub fn backup_xml(
    socket: &Path,
    disks: &[BackupDisk],
    all_targets: &[String],
    incremental: Option<&str>,
) -> String {
    let mut s = String::from("<domainbackup mode='pull'>\n");
    if let Some(cp) = incremental {
        let _ = writeln!(s, "  <incremental>{}</incremental>", escape(cp));
    }
    let _ = writeln!(
        s,
        "  <server transport='unix' socket='{}'/>",
        escape(&socket.display().to_string())
    );
    s.push_str("  <disks>\n");
    for t in all_targets {
        match disks.iter().find(|d| &d.target == t) {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "    <disk name='{}' backup='yes' type='file'>\n      <driver type='qcow2'/>\n      <scratch file='{}'/>\n    </disk>",
                    escape(&d.target),
                    escape(&d.scratch.display().to_string())
                );
            }
            None => {
                let _ = writeln!(s, "    <disk name='{}' backup='no'/>", escape(t));
            }
        }
    }
    s.push_str("  </disks>\n</domainbackup>\n");
    s
}

/// The `<domaincheckpoint>` created with the backup: a bitmap on each
/// backed-up disk, none on the others.
pub fn checkpoint_xml(name: &str, disks: &[String], all_targets: &[String]) -> String {
    let mut s = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>shear: changes since this backup</description>\n  <disks>\n",
        escape(name)
    );
    for t in all_targets {
        let how = if disks.contains(t) { "bitmap" } else { "no" };
        let _ = writeln!(s, "    <disk name='{}' checkpoint='{how}'/>", escape(t));
    }
    s.push_str("  </disks>\n</domaincheckpoint>\n");
    s
}

/// A restored disk, for [`adapt_for_restore`].
#[derive(Debug, Clone)]
pub struct RestoredDisk {
    /// Target name (`vda`).
    pub target: String,
    /// The restored image.
    pub path: PathBuf,
    /// Its format (`raw`, `qcow2`).
    pub format: String,
}

/// The captured domain XML adapted to restored disks: each restored disk's
/// source is its restored file (a plain file of the restored format, no
/// backing chain); a writable disk that was not restored is dropped (the
/// new domain must not share the original's image); unless `replace`, the
/// domain gets `new_name`, no UUID and no MAC addresses (libvirt makes new
/// ones). Returns the XML and notes on what was changed.
pub fn adapt_for_restore(
    xml: &str,
    restored: &[RestoredDisk],
    new_name: Option<&str>,
    replace: bool,
) -> Result<(String, Vec<String>), LibvirtError> {
    let mut root = parse(xml)?;
    if root.name != "domain" {
        return Err(bad(format!(
            "root element is <{}>, not <domain>",
            root.name
        )));
    }
    let mut notes = Vec::new();
    if let Some(n) = new_name {
        match root.child_mut("name") {
            Some(e) => e.set_text(n),
            None => return Err(bad("the domain has no <name>")),
        }
    }
    // libvirt keeps run-time ids in a live XML: not part of a definition.
    root.remove_attr("id");
    if !replace {
        root.remove_children("uuid");
    }
    if let Some(devices) = root.child_mut("devices") {
        let mut kept = Vec::with_capacity(devices.children.len());
        for node in std::mem::take(&mut devices.children) {
            let Node::Element(mut el) = node else {
                kept.push(node);
                continue;
            };
            if el.name == "interface" && !replace {
                el.remove_children("mac");
            }
            if el.name != "disk" {
                kept.push(Node::Element(el));
                continue;
            }
            let target = el
                .child("target")
                .and_then(|t| t.attr("dev"))
                .unwrap_or("")
                .to_string();
            let device = el.attr("device").unwrap_or("disk").to_string();
            let read_only = el.child("readonly").is_some();
            match restored.iter().find(|r| r.target == target) {
                Some(r) => {
                    el.set_attr("type", "file");
                    el.remove_children("source");
                    el.remove_children("backingStore");
                    let mut src = Element::new("source");
                    src.set_attr("file", &r.path.display().to_string());
                    // An empty <backingStore/>: no backing chain.
                    let bs = Element::new("backingStore");
                    let mut driver = el.child("driver").cloned().unwrap_or_else(|| {
                        let mut d = Element::new("driver");
                        d.set_attr("name", "qemu");
                        d
                    });
                    driver.set_attr("type", &r.format);
                    el.remove_children("driver");
                    // driver, source, backingStore first: libvirt's order.
                    let mut children =
                        vec![Node::Element(driver), Node::Element(src), Node::Element(bs)];
                    children.append(&mut el.children);
                    el.children = children;
                    kept.push(Node::Element(el));
                }
                None if matches!(device.as_str(), "disk" | "lun") && !read_only => {
                    notes.push(format!(
                        "disk {target} was not restored: left out of the restored domain (it \
                         must not share the original's image)"
                    ));
                }
                None => kept.push(Node::Element(el)),
            }
        }
        devices.children = kept;
    }
    Ok((root.to_xml(), notes))
}

/// The `size` of each `<disk>` of a checkpoint XML (`checkpoint-dumpxml
/// --size`): dirty bytes since the checkpoint. Disks without one are left
/// out.
pub fn parse_checkpoint_sizes(text: &str) -> Result<Vec<(String, u64)>, LibvirtError> {
    let root = parse(text)?;
    if root.name != "domaincheckpoint" {
        return Err(bad(format!(
            "root element is <{}>, not <domaincheckpoint>",
            root.name
        )));
    }
    Ok(root
        .child("disks")
        .into_iter()
        .flat_map(Element::elements)
        .filter(|d| d.name == "disk")
        .filter_map(|d| Some((d.attr("name")?.to_string(), d.attr("size")?.parse().ok()?)))
        .collect())
}

/// Parse `checkpoint-list --name` output: one name per line.
pub fn parse_name_list(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu' id='7'>
  <name>web &amp; db</name>
  <uuid>3e3fce45-4f53-4fa7-bb32-11f34168b82b</uuid>
  <!-- a comment -->
  <memory unit='KiB'>262144</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>"#;

    #[test]
    fn domain_disks_are_read_from_their_own_elements_not_the_backing_chain() {
        let d = parse_domain(DOMAIN).unwrap();
        assert_eq!(d.name, "web & db");
        assert_eq!(d.uuid, "3e3fce45-4f53-4fa7-bb32-11f34168b82b");
        assert_eq!(d.disks.len(), 3);
        assert_eq!(d.disks[0].target, "vda");
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some("/var/lib/libvirt/images/web.qcow2")
        );
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert!(d.disks[0].backed_up());
        assert_eq!(d.disks[1].source.as_deref(), Some("/dev/vg/data"));
        assert_eq!(d.disks[1].kind, "block");
        assert!(d.disks[1].backed_up());
        assert!(d.disks[2].read_only);
        assert!(!d.disks[2].backed_up(), "a CD-ROM is not backed up");
        parse_domain("<network><name>x</name></network>").unwrap_err();
        parse_domain("<domain><devices/></domain>").unwrap_err();
        parse_domain("<domain><name>x</name>").unwrap_err();
    }

    #[test]
    fn backup_and_checkpoint_xml_name_every_disk_and_parse_back() {
        let all = vec!["vda".to_string(), "vdb".to_string()];
        let x = backup_xml(
            Path::new("/run/shear/lv-x/nbd.sock"),
            &[BackupDisk {
                target: "vda".into(),
                scratch: "/var/lib/shear/fleece/a'b.qcow2".into(),
            }],
            &all,
            Some("shear-0123-aa"),
        );
        let r = parse(&x).unwrap();
        assert_eq!(r.name, "domainbackup");
        assert_eq!(r.attr("mode"), Some("pull"));
        assert_eq!(r.child("incremental").unwrap().text(), "shear-0123-aa");
        let srv = r.child("server").unwrap();
        assert_eq!(srv.attr("transport"), Some("unix"));
        assert_eq!(srv.attr("socket"), Some("/run/shear/lv-x/nbd.sock"));
        let disks: Vec<&Element> = r.child("disks").unwrap().elements().collect();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].attr("backup"), Some("yes"));
        assert_eq!(
            disks[0].child("scratch").unwrap().attr("file"),
            Some("/var/lib/shear/fleece/a'b.qcow2"),
            "quotes in paths are escaped"
        );
        assert_eq!(disks[1].attr("name"), Some("vdb"));
        assert_eq!(disks[1].attr("backup"), Some("no"));
        let full = backup_xml(Path::new("/s"), &[], &all, None);
        assert!(parse(&full).unwrap().child("incremental").is_none());

        let c = parse(&checkpoint_xml("shear-0123-bb", &["vda".into()], &all)).unwrap();
        assert_eq!(c.name, "domaincheckpoint");
        assert_eq!(c.child("name").unwrap().text(), "shear-0123-bb");
        let cd: Vec<(Option<&str>, Option<&str>)> = c
            .child("disks")
            .unwrap()
            .elements()
            .map(|d| (d.attr("name"), d.attr("checkpoint")))
            .collect();
        assert_eq!(
            cd,
            vec![(Some("vda"), Some("bitmap")), (Some("vdb"), Some("no"))]
        );
    }

    #[test]
    fn restore_xml_points_at_restored_files_with_a_new_identity() {
        let restored = vec![RestoredDisk {
            target: "vda".into(),
            path: "/restore/vda.raw".into(),
            format: "raw".into(),
        }];
        let (x, notes) = adapt_for_restore(DOMAIN, &restored, Some("web-restored"), false).unwrap();
        let d = parse_domain(&x).unwrap();
        assert_eq!(d.name, "web-restored");
        assert_eq!(d.uuid, "", "a new UUID is libvirt's to make");
        assert_eq!(
            d.disks.len(),
            2,
            "vdb (not restored) is dropped, the CD-ROM kept"
        );
        assert_eq!(d.disks[0].source.as_deref(), Some("/restore/vda.raw"));
        assert_eq!(d.disks[0].format.as_deref(), Some("raw"));
        assert_eq!(d.disks[0].kind, "file");
        assert!(!x.contains("base.qcow2"), "no backing chain: {x}");
        assert!(!x.contains("52:54:00:12:34:56"), "MAC dropped: {x}");
        assert!(!x.contains("id='7'") && !x.contains("id=\"7\""));
        assert!(x.contains("<source network=\"default\"/>"));
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("vdb"), "{notes:?}");

        let (x, _) = adapt_for_restore(DOMAIN, &restored, None, true).unwrap();
        let d = parse_domain(&x).unwrap();
        assert_eq!(d.name, "web & db");
        assert_eq!(d.uuid, "3e3fce45-4f53-4fa7-bb32-11f34168b82b");
        assert!(x.contains("52:54:00:12:34:56"));
        assert!(x.contains("web &amp; db"), "text is escaped again: {x}");
    }

    #[test]
    fn checkpoint_sizes_are_read_per_disk() {
        let x = "<domaincheckpoint><name>c</name><disks>\
                 <disk name='vda' checkpoint='bitmap' bitmap='c' size='2097152'/>\
                 <disk name='vdb' checkpoint='bitmap' bitmap='c'/>\
                 <disk name='vdc' checkpoint='no'/></disks>\
                 <domain><devices><disk name='x' size='1'/></devices></domain></domaincheckpoint>";
        assert_eq!(
            parse_checkpoint_sizes(x).unwrap(),
            vec![("vda".to_string(), 2097152)]
        );
        parse_checkpoint_sizes("<domain/>").unwrap_err();
    }

    #[test]
    fn name_lists_skip_blank_lines() {
        assert_eq!(
            parse_name_list("a\n\n  b \n"),
            vec!["a".to_string(), "b".to_string()]
        );
    }
}
