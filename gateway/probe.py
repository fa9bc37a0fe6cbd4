"""``fieldlink-gateway probe``: read live registers and show every way to decode them.

Device manuals get byte order wrong or leave it out; the quickest way to the right
tag definition is to read the registers and look at every type x byte order side by
side, then copy the tag for the one that shows the expected value::

    fieldlink-gateway probe tcp://10.0.0.5:502 --unit 1 --address 100 --count 4
    fieldlink-gateway probe rtu:///dev/ttyUSB0 --baudrate 9600 --parity N --unit 3 --address 0 --count 2
    fieldlink-gateway probe tcp://10.0.0.5:502 --address 100 --count 4 --pick float32:CDAB@102

It reads with the gateway's own Modbus adapter and codec, so what it shows is what
a tag with the same settings will report.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fieldlink.configkit import parse_duration
from gateway.sources.modbus.client import BusSpec, ModbusBus, ModbusError
from gateway.sources.modbus.codec import ByteOrder, RegisterType, decode_registers, decode_string

__all__ = ["add_probe_parser", "run_probe"]

TABLES = ("holding", "input", "coil", "discrete_input")
NUMERIC = [k for k in RegisterType if k.is_numeric]


def add_probe_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    probe = commands.add_parser(
        "probe",
        help="read live registers and print every type x byte order interpretation",
        description="Read registers from a Modbus device and print every type x byte order "
        "interpretation, then a ready-to-paste TOML tag for the one you pick.",
    )
    probe.add_argument("url", help="tcp://HOST:PORT, rtu+tcp://HOST:PORT (RTU over TCP) or rtu:///dev/ttyUSB0")
    probe.add_argument("--unit", type=int, default=1, help="Modbus unit id (default 1)")
    probe.add_argument("--address", type=int, default=0, help="first address, in --address-base (default 0)")
    probe.add_argument("--count", type=int, default=4, help="registers (or bits) to read (default 4)")
    probe.add_argument("--table", choices=TABLES, default="holding", help="default: holding")
    probe.add_argument("--address-base", type=int, choices=(0, 1), default=0, help="0 (default) or 1")
    probe.add_argument("--timeout", default="2s", help="per request (default 2s)")
    probe.add_argument("--baudrate", type=int, default=19200, help="RTU: default 19200")
    probe.add_argument("--parity", choices=("N", "E", "O"), default="E", help="RTU: default E")
    probe.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    probe.add_argument("--bytesize", type=int, choices=(7, 8), default=8)
    probe.add_argument(
        "--pick",
        metavar="TYPE:ORDER[@ADDRESS]",
        help="print the TOML tag for this interpretation, e.g. float32:CDAB@102 (asked for when interactive)",
    )
    probe.add_argument("--name", default=None, help="tag name for the TOML (default value_ADDRESS)")


def bus_from_url(url: str, args: argparse.Namespace, timeout: float) -> BusSpec:
    parts = urlsplit(url if "://" in url else f"rtu://{url}")
    if parts.scheme == "rtu":
        path = parts.path or parts.netloc
        return BusSpec(
            "rtu",
            serial_port=path,
            baudrate=args.baudrate,
            parity=args.parity,
            stopbits=args.stopbits,
            bytesize=args.bytesize,
            timeout=timeout,
        )
    if parts.scheme in ("tcp", "rtu+tcp") and parts.hostname:
        transport = "tcp" if parts.scheme == "tcp" else "rtu_tcp"
        return BusSpec(transport, host=parts.hostname, port=parts.port or 502, timeout=timeout)
    raise ValueError(f"cannot read {url!r}: expected tcp://HOST:PORT, rtu+tcp://HOST:PORT or rtu:///dev/ttyX")


@dataclass(frozen=True)
class Interpretation:
    kind: RegisterType
    order: ByteOrder
    address: int  # in the user's address base
    text: str


def _format(value: int | float | str, kind: RegisterType) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.7g}" if kind is RegisterType.FLOAT32 else f"{value:.15g}"
    return str(value)


def interpretations(words: Sequence[int], first_address: int) -> list[Interpretation]:
    """Every numeric type at every aligned offset that fits, in every byte order, and the string."""
    found: list[Interpretation] = []
    for kind in NUMERIC:
        for offset in range(0, len(words) - kind.width + 1, kind.width):
            chunk = words[offset : offset + kind.width]
            for order in ByteOrder:
                value = decode_registers(chunk, kind, order)
                found.append(Interpretation(kind, order, first_address + offset, _format(value, kind)))
    for order in ByteOrder:
        found.append(Interpretation(RegisterType.STRING, order, first_address, repr(decode_string(words, order))))
    return found


def render_grid(words: Sequence[int], first_address: int) -> str:
    lines = ["", "address  raw     dec    bits"]
    for i, word in enumerate(words):
        lines.append(f"{first_address + i:>7}  0x{word:04X}  {word:>5}  {word:016b}")
    rows: dict[tuple[RegisterType, int], dict[ByteOrder, str]] = {}
    for item in interpretations(words, first_address):
        rows.setdefault((item.kind, item.address), {})[item.order] = item.text
    cells = [[f"{kind.value}@{address}", *(row[o] for o in ByteOrder)] for (kind, address), row in rows.items()]
    header = ["type@address", *(o.value for o in ByteOrder)]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.append("")
    lines.append("16-bit types: ABCD = CDAB and BADC = DCBA. 64-bit orders may also be written ABCDEFGH, GHEFCDAB, ...")
    return "\n".join(lines)


def parse_pick(pick: str, first_address: int, count: int) -> tuple[RegisterType, ByteOrder, int]:
    """``float32:CDAB@102`` (or ``float32 CDAB @102``) -> type, order, address."""
    text = pick.replace(" ", ":").replace("::", ":")
    address = first_address
    if "@" in text:
        text, _, at = text.partition("@")
        address = int(at)
    kind_name, _, order_name = text.strip(":").partition(":")
    kind = RegisterType(kind_name.lower())
    if kind is RegisterType.BOOL:
        raise ValueError('a bool in a register is one bit: write the tag with type = "bool" and bit = 0..15')
    order = ByteOrder.parse(order_name or "ABCD")
    width = count - (address - first_address) if kind is RegisterType.STRING else kind.width
    if not first_address <= address <= first_address + count - width:
        raise ValueError(f"{kind.value} at {address} is not inside the registers read")
    return kind, order, address


def tag_toml(
    kind: RegisterType, order: ByteOrder, address: int, *, table: str, length: int | None, name: str | None
) -> str:
    lines = [
        "[[sources.devices.registers]]",
        f'name = "{name or f"value_{address}"}"',
        f'table = "{table}"',
        f"address = {address}",
        f'type = "{kind.value}"',
    ]
    if kind is RegisterType.STRING:
        lines.append(f"length = {length}")
    if kind is not RegisterType.BOOL:
        lines.append(f'byte_order = "{order.value}"')
    return "\n".join(lines)


async def _read(spec: BusSpec, args: argparse.Namespace) -> tuple[list[int], float]:
    bus = ModbusBus(spec)
    try:
        started = time.monotonic()
        words = await bus.read(args.table, args.unit, args.address - args.address_base, args.count, spec.timeout)
        return words, time.monotonic() - started
    finally:
        bus.close()


def _checked_spec(args: argparse.Namespace) -> BusSpec:
    spec = bus_from_url(args.url, args, parse_duration(args.timeout))
    limit = 2000 if args.table in ("coil", "discrete_input") else 125
    if not 1 <= args.count <= limit:
        raise ValueError(f"--count must be 1..{limit} for {args.table}")
    if args.address < args.address_base:
        raise ValueError(f"--address {args.address} is below --address-base {args.address_base}")
    return spec


def run_probe(args: argparse.Namespace) -> int:
    try:
        spec = _checked_spec(args)
    except ValueError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    try:
        words, took = asyncio.run(_read(spec, args))
    except ModbusError as exc:
        print(f"probe: {args.url} unit {args.unit}: {exc}", file=sys.stderr)
        return 1
    last = args.address + args.count - 1
    print(
        f"{args.url} unit {args.unit}: {args.table} {args.address}..{last}"
        f" (address_base {args.address_base}), read in {took * 1000:.1f} ms"
    )
    if args.table in ("coil", "discrete_input"):
        for i, bit in enumerate(words):
            print(f"{args.address + i:>7}  {'true' if bit else 'false'}")
        print()
        print(tag_toml(RegisterType.BOOL, ByteOrder.ABCD, args.address, table=args.table, length=None, name=args.name))
        return 0
    print(render_grid(words, args.address))
    pick = args.pick
    if pick is None and sys.stdin.isatty():
        pick = input("\nWhich one is right? TYPE:ORDER[@ADDRESS], e.g. float32:CDAB (Enter to quit): ").strip()
    if not pick:
        print("\nRe-run with --pick TYPE:ORDER[@ADDRESS] for a ready-to-paste TOML tag.")
        return 0
    try:
        kind, order, address = parse_pick(pick, args.address, args.count)
    except ValueError as exc:
        print(f"probe: --pick {pick!r}: {exc}", file=sys.stderr)
        return 2
    length = args.count - (address - args.address) if kind is RegisterType.STRING else None
    print()
    print(tag_toml(kind, order, address, table=args.table, length=length, name=args.name))
    if args.address_base:
        print("# (addresses above are 1-based: set address_base = 1 on the device or source)")
    return 0
