#!/usr/bin/python3
"""Drive an emulated BMC with OpenStack's sushy and print what it saw as JSON.

Usage: sushy_check.py URL USER PASSWORD CA_FILE AUTH   (AUTH: session or basic)

Run by peers_test.go, which starts the BMC and checks the output and the
emulated machine's state. Any exception fails the test with its traceback.
"""
import json
import sys

import sushy
from sushy import auth as sushy_auth


def main():
    url, user, password, cafile, mode = sys.argv[1:6]
    authenticator = (sushy_auth.SessionAuth if mode == "session" else sushy_auth.BasicAuth)(
        username=user, password=password)
    root = sushy.Sushy(url, verify=cafile, auth=authenticator)
    out = {"redfish_version": root.redfish_version, "uuid": root.uuid}

    systems = root.get_system_collection().get_members()
    out["systems"] = len(systems)
    system = systems[0]
    out["serial"] = system.serial_number
    out["system_uuid"] = system.uuid
    out["processor_count"] = system.processors.summary.count
    out["cpus"] = len([p for p in system.processors.get_members()
                       if p.processor_type == sushy.PROCESSOR_TYPE_CPU])
    out["memory_gib"] = system.memory_summary.size_gib
    try:
        out["macs"] = sorted(system.ethernet_interfaces.summary)
    except sushy.exceptions.MissingAttributeError:
        out["macs"] = []
    try:
        drives = [d for s in system.storage.get_members() for d in s.drives]
        out["drives"] = len(drives)
        out["drive_bytes"] = sum(d.capacity_bytes or 0 for d in drives)
    except sushy.exceptions.MissingAttributeError:
        out["drives"] = 0

    powers = []
    for reset in (sushy.RESET_ON, sushy.RESET_FORCE_OFF, sushy.RESET_ON):
        system.reset_system(reset)
        system.refresh()
        powers.append(str(system.power_state.value))
    out["powers"] = powers
    out["allowed_resets"] = sorted(str(v.value) for v in system.get_allowed_reset_system_values())

    system.set_system_boot_options(sushy.BOOT_SOURCE_TARGET_PXE,
                                   enabled=sushy.BOOT_SOURCE_ENABLED_ONCE,
                                   mode=sushy.BOOT_SOURCE_MODE_UEFI)
    system.refresh()
    out["boot"] = {"target": str(system.boot.target.value),
                   "enabled": str(system.boot.enabled.value),
                   "mode": str(system.boot.mode.value)}
    try:
        system.set_system_boot_options("Teleport", enabled=sushy.BOOT_SOURCE_ENABLED_ONCE)
        out["bad_target"] = "accepted"
    except (sushy.exceptions.InvalidParameterValueError, sushy.exceptions.BadRequestError) as e:
        out["bad_target"] = type(e).__name__

    manager = root.get_manager_collection().get_members()[0]
    media = {m.identity: m for m in manager.virtual_media.get_members()}
    cd = media["CD1"]
    cd.insert_media("http://10.0.0.1/images/agent.iso")
    cd.refresh()
    out["media_inserted"] = {"inserted": cd.inserted, "image": cd.image, "image_name": cd.image_name}
    cd.eject_media()
    cd.refresh()
    out["media_ejected"] = {"inserted": cd.inserted, "image": cd.image}

    # Log out (deletes the session, if any), then drop the connections.
    authenticator.close()
    root._conn.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
