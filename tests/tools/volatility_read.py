"""Reads pages of a LiME or ELF core dump through Volatility 3's own layers and prints, per
address, the SHA-1 of the page it read: `volatility_read.py FILE lime|elf ADDR...`.

Used by the end-to-end dump test to show that a real memory forensics tool opens the files
`kvmi dump` writes; the test compares the hashes with the raw dump's pages."""

import hashlib
import sys

from volatility3.framework import contexts
from volatility3.framework.layers import elf, lime, physical


def main() -> None:
    path, kind, *addresses = sys.argv[1:]
    ctx = contexts.Context()
    ctx.config["base.location"] = "file://" + path
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    stacker = {"lime": lime.LimeStacker, "elf": elf.Elf64Stacker}[kind]
    layer = stacker.stack(ctx, "base")
    if layer is None:
        sys.exit(f"volatility3 did not recognise {path} as {kind}")
    print(f"layer {type(layer).__name__} max {layer.maximum_address:#x}")
    for text in addresses:
        address = int(text, 0)
        page = layer.read(address, 4096)
        print(f"page {address:#x} {hashlib.sha1(page).hexdigest()}")


if __name__ == "__main__":
    main()
