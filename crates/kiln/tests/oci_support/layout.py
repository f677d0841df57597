#!/usr/bin/env python3
"""Writes small OCI image layouts by hand for kiln's container-source tests.

usage: layout.py DIR CASE
  whiteouts  three layers (gzip, zstd, plain) exercising every whiteout case of the OCI
             image-spec layer rules, tagged v1, config with Entrypoint/Cmd/Env/User
  whiteouts-gzip  the same layers, the zstd one gzip-compressed instead (same diff_ids), for
             umoci 0.4, which reads no zstd
  escape     one layer holding the whiteout ../.wh.x
  noarch     tag v1 names an image index whose only manifest is linux/arm64
  agent TAR  TAR (a whole root filesystem, e.g. a Debian tree) as an uncompressed first layer,
             a second layer adding /srv/agent.txt, tagged v1, config Entrypoint/Cmd that echo a
             marker: the image a microVM's agent service is made from
"""
import gzip, hashlib, io, json, os, subprocess, sys, tarfile

MTIME = 1700000000


def entry(name, kind="file", data=b"", mode=0o644, uid=0, gid=0, link="", xattrs=None):
    return dict(name=name, kind=kind, data=data, mode=mode, uid=uid, gid=gid, link=link,
                xattrs=xattrs or {})


def d(name, mode=0o755, uid=0, gid=0, xattrs=None):
    return entry(name, "dir", mode=mode, uid=uid, gid=gid, xattrs=xattrs)


def f(name, data, mode=0o644, uid=0, gid=0, xattrs=None):
    return entry(name, "file", data=data, mode=mode, uid=uid, gid=gid, xattrs=xattrs)


def wh(name):
    return entry(name, "file", mode=0o644)


def tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti = tarfile.TarInfo(e["name"])
            ti.mtime = MTIME
            ti.mode = e["mode"]
            ti.uid, ti.gid = e["uid"], e["gid"]
            ti.uname = ti.gname = ""
            if e["xattrs"]:
                ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in e["xattrs"].items()}
            data = None
            if e["kind"] == "dir":
                ti.type = tarfile.DIRTYPE
            elif e["kind"] == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e["link"]
            elif e["kind"] == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e["link"]
            else:
                ti.size = len(e["data"])
                data = io.BytesIO(e["data"])
            t.addfile(ti, data)
    return buf.getvalue()


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Layout:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as o:
            json.dump({"imageLayoutVersion": "1.0.0"}, o)

    def blob(self, b):
        dg = sha(b)
        with open(os.path.join(self.root, "blobs", "sha256", dg[7:]), "wb") as o:
            o.write(b)
        return dg

    def layer(self, entries, comp):
        raw = tar_bytes(entries)
        if comp == "gzip":
            blob = gzip.compress(raw, mtime=0)
            mt = "application/vnd.oci.image.layer.v1.tar+gzip"
        elif comp == "zstd":
            blob = subprocess.run(["zstd", "-q", "-c"], input=raw, stdout=subprocess.PIPE,
                                  check=True).stdout
            mt = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, mt = raw, "application/vnd.oci.image.layer.v1.tar"
        return {"mediaType": mt, "digest": self.blob(blob), "size": len(blob)}, sha(raw)

    def file_layer(self, path):
        """An uncompressed layer copied from a tar file, hashed as it streams."""
        h = hashlib.sha256()
        tmp = os.path.join(self.root, "blobs", "sha256", ".partial")
        size = 0
        with open(path, "rb") as i, open(tmp, "wb") as o:
            while True:
                chunk = i.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                o.write(chunk)
                size += len(chunk)
        dg = "sha256:" + h.hexdigest()
        os.replace(tmp, os.path.join(self.root, "blobs", "sha256", dg[7:]))
        return {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": dg,
                "size": size}, dg

    def manifest(self, layers, arch="amd64", config_extra=None):
        descs, diffs = [], []
        for entries, comp in layers:
            if comp == "file":
                desc, diff = self.file_layer(entries)
            else:
                desc, diff = self.layer(entries, comp)
            descs.append(desc)
            diffs.append(diff)
        config = {"architecture": arch, "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": diffs},
                  "config": config_extra or {}}
        cb = json.dumps(config, sort_keys=True).encode()
        m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": self.blob(cb), "size": len(cb)},
             "layers": descs}
        mb = json.dumps(m, sort_keys=True).encode()
        return {"mediaType": m["mediaType"], "digest": self.blob(mb), "size": len(mb),
                "platform": {"architecture": arch, "os": "linux"}}

    def index(self, descs, tag):
        top = []
        for desc in descs:
            desc = dict(desc)
            desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
            top.append(desc)
        with open(os.path.join(self.root, "index.json"), "w") as o:
            json.dump({"schemaVersion": 2, "manifests": top}, o)


def whiteouts(zstd="zstd"):
    big = bytes(range(256)) * 300
    l1 = [
        d("./"),
        d("a"), f("a/f1", b"one\n"), f("a/f2", b"two\n"), d("a/sub"), f("a/sub/g", b"g\n"),
        d("b", mode=0o750, uid=1000, gid=1000), f("b/x", b"x\n"),
        f("c", b"c\n"), d("d"), f("d/y", b"y\n"),
        f("h1", b"hard\n"), entry("h2", "hardlink", link="h1"),
        f("keep", big, mode=0o4755),
        f("x", b"xattr\n", xattrs={"user.foo": "one"}),
        entry("sym", "symlink", link="a/f1", mode=0o777),
        d("e"), d("e/deep"), f("e/deep/z", b"z\n"),
        d("opq"), f("opq/o1", b"o1\n"), f("opq/o2", b"o2\n"),
        f("fd", b"file becomes dir\n"),
        d("dd"), f("dd/inner", b"dir becomes file\n"),
        d("srv", uid=1000, gid=1000), f("srv/data", b"d\n", mode=0o600, uid=1000, gid=1000),
    ]
    l2 = [
        wh(".wh.c"),
        d("a"), wh("a/.wh.f1"),
        d("b", mode=0o750, uid=1000, gid=1000), wh("b/.wh..wh..opq"), f("b/new", b"new\n"),
        d("opq"), f("opq/o3", b"o3 same layer\n"), wh("opq/.wh..wh..opq"),
        wh(".wh.d"), f("d", b"dir replaced by a file\n"),
        wh(".wh.e"),
        entry("hl3", "hardlink", link="keep"),
        wh(".wh.h1"),
        f("x", b"xattr 2\n", xattrs={"user.bar": "two"}),
        wh(".wh.sym"), entry("sym2", "symlink", link="a/f2", mode=0o777),
        wh(".wh.nothere"),
        d("fd", mode=0o700), f("fd/inner", b"now a dir\n"),
    ]
    l3 = [
        d("a"), wh("a/.wh.sub"),
        f("dd", b"a file over a directory\n", mode=0o640, gid=1000),
        f("a/f3", b"three\n"),
        f("srv/data", b"changed\n", mode=0o600, uid=1000, gid=1000),
    ]
    return [(l1, "gzip"), (l2, zstd), (l3, "plain")]


def main():
    root, case = sys.argv[1], sys.argv[2]
    lay = Layout(root)
    if case in ("whiteouts", "whiteouts-gzip"):
        m = lay.manifest(whiteouts("zstd" if case == "whiteouts" else "gzip"), config_extra={
            "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $GREETING"],
            "Env": ["GREETING=hello from the image", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/srv", "User": "1000:1000"})
        lay.index([m], "v1")
    elif case == "escape":
        m = lay.manifest([([d("./"), f("ok", b"ok\n"), wh("../.wh.x")], "gzip")])
        lay.index([m], "v1")
    elif case == "noarch":
        m = lay.manifest([([d("./"), f("ok", b"ok\n")], "gzip")], arch="arm64")
        ib = json.dumps({"schemaVersion": 2,
                         "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [m]}).encode()
        lay.index([{"mediaType": "application/vnd.oci.image.index.v1+json",
                    "digest": lay.blob(ib), "size": len(ib)}], "v1")
    elif case == "agent":
        top = [d("srv"), f("srv/agent.txt", b"KILN-MICROVM-SERVICE-RAN\n")]
        m = lay.manifest([(sys.argv[3], "file"), (top, "gzip")], config_extra={
            "Entrypoint": ["/bin/cat"], "Cmd": ["agent.txt"], "WorkingDir": "/srv",
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
        lay.index([m], "v1")
    else:
        sys.exit("unknown case " + case)


main()
