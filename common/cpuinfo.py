"""Fields of /proc/cpuinfo: which CPU this is names the machine whose levers are cached (common/levers.py)
and is printed with every benchmark (parity.bench)."""
from __future__ import annotations


def cpuinfo_field(name: str) -> str:
    """The first value of `name` ("vendor_id", "model name", ...) in /proc/cpuinfo; "" off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""
