#!/usr/bin/python3
"""Copy a trimmed subset of DMTF's public Redfish mockups into this folder.

Usage: import.py SRC_DIR   (SRC_DIR holds public-rackmount1/, public-localstorage/,
public-smartnic/ and LICENSE.md, as DMTF publishes them)

The emulator embeds what this writes, so the product never reads the originals at
run time. We keep only what a provisioning client reads (systems, inventory, boot,
virtual media, managers, chassis) and drop the rest so the embedded data stays small.
Every navigation link that would point at a dropped resource is removed as well, so
a client that walks the tree never meets a 404. A few edits make the trees match
what the emulator implements; each is listed in EDITS below and in README.md.
"""
import json
import os
import shutil
import sys

MOCKUPS = ["public-rackmount1", "public-localstorage", "public-smartnic"]

# Top-level services and resources the emulator does not serve.
DROP_PREFIXES = [
    "AccountService", "CertificateService", "ComponentIntegrity", "EventService",
    "Fabrics", "KeyService", "Registries", "ServiceConditions", "TaskService",
    "UpdateService",
    # Sessions are live state; the emulator renders them.
    "SessionService/Sessions",
    # The SmartNIC's own SoC system: a second ComputerSystem confuses clients that
    # drive "the" system of a BMC (bmclib picks the only one), so keep the host only.
    "Systems/Card1-SoC",
    # The host's USB link to the BMC (a Redfish host interface): not a port a
    # server boots from, and it would take one of the per-BMC MAC addresses.
    "Systems/437XR1138R2/EthernetInterfaces/ToManager",
]

# Path components whose subtrees are telemetry, security or logging detail that
# provisioning clients do not read.
DROP_COMPONENTS = {
    "AccelerationFunctions", "Certificates", "Controls", "DedicatedNetworkPorts",
    "EnvironmentMetrics", "GraphicsControllers", "HostInterfaces", "LogServices",
    "PowerSubsystem", "ProcessorMetrics", "SD", "SecureBoot", "SecurityPolicy",
    "Sensors", "Settings", "ThermalSubsystem", "TrustedComponents", "USBControllers",
}

# Paths the emulator serves without a file.
DYNAMIC = {"/redfish/v1/SessionService/Sessions"}


def keep(rel):
    if rel == "":
        return True
    if any(rel == p or rel.startswith(p + "/") for p in DROP_PREFIXES):
        return False
    return not (set(rel.split("/")) & DROP_COMPONENTS)


def uri(rel):
    return "/redfish/v1" + ("/" + rel if rel else "")


def is_link(v):
    return isinstance(v, dict) and "@odata.id" in v and len(v) == 1


def resolves(link, kept):
    target = link.split("#", 1)[0].rstrip("/") or "/redfish/v1"
    return target in kept or target in DYNAMIC


def prune(node, kept):
    """Remove links to resources that are not kept; fix the @odata.count beside them."""
    if isinstance(node, list):
        out = []
        for v in node:
            if is_link(v) and not resolves(v["@odata.id"], kept):
                continue
            out.append(prune(v, kept))
        return out
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if is_link(v) and not resolves(v["@odata.id"], kept):
            continue
        if k == "@Redfish.ActionInfo" and isinstance(v, str) and not resolves(v, kept):
            continue
        out[k] = prune(v, kept)
    for k, v in list(out.items()):
        if isinstance(v, list) and k + "@odata.count" in out:
            out[k + "@odata.count"] = len(v)
    # A dict left holding only annotations of removed links is noise.
    for k, v in list(out.items()):
        if isinstance(v, dict) and v and all(x.endswith("@odata.count") for x in v):
            del out[k]
    return out


def edit(name, rel, doc):
    """The few deliberate changes; see README.md."""
    if rel == "":
        # The emulator implements no query parameters ($expand, $select, only, excerpt).
        doc["ProtocolFeaturesSupported"] = {
            "ExpandQuery": {"ExpandAll": False, "Levels": False, "Links": False, "NoLinks": False},
            "SelectQuery": False, "FilterQuery": False, "OnlyMemberQuery": False, "ExcerptQuery": False,
        }
    if rel == "odata":
        doc["value"] = [v for v in doc["value"] if resolves(v["url"], KEPT)]
    if name == "public-rackmount1" and rel == "Managers/BMC":
        # Clients such as bmclib look for virtual media under the manager; this mockup
        # keeps it under the system. Link the same collection from the manager too.
        doc["VirtualMedia"] = {"@odata.id": "/redfish/v1/Systems/437XR1138R2/VirtualMedia"}
    return doc


def main():
    src = sys.argv[1]
    dst = os.path.dirname(os.path.abspath(__file__))
    global KEPT
    for name in MOCKUPS:
        root = os.path.join(src, name)
        rels = []
        for d, _, files in os.walk(root):
            if "index.json" not in files:
                continue
            rel = os.path.relpath(d, root)
            rel = "" if rel == "." else rel
            if keep(rel):
                rels.append(rel)
        KEPT = {uri(r) for r in rels}
        out_root = os.path.join(dst, name)
        shutil.rmtree(out_root, ignore_errors=True)
        for rel in sorted(rels):
            with open(os.path.join(root, rel, "index.json")) as f:
                doc = json.load(f)
            doc = edit(name, rel, prune(doc, KEPT))
            out = os.path.join(out_root, rel, "index.json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(doc, f, indent=1, ensure_ascii=False)
                f.write("\n")
        print(f"{name}: {len(rels)} resources")
    shutil.copy(os.path.join(src, "LICENSE.md"), os.path.join(dst, "LICENSE.md"))


KEPT = set()
if __name__ == "__main__":
    main()
