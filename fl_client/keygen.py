"""`fl-client keygen`: the site makes its own SuperNode key pair; only the public key leaves.

With ``--site site.yaml`` (the skeleton the operator sent) the private key goes where the
YAML's ``deployment.private_key`` points, so ``fl-client start`` finds it; with ``--name
NAME --out DIR`` it is ``DIR/NAME_auth`` (before the site has a YAML). The public key is
printed, with the ``fl-server`` command the operator runs to register it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shared.config import load_site
from shared.site_keys import SITE_NAME, SITE_NAME_RULE, write_key_pair


def keygen(site_yaml: Path | None, name: str | None, out: Path | None, force: bool) -> int:
    """Write the key pair, print where it is and what to send; the exit code."""
    if site_yaml is not None:
        site = load_site(site_yaml)
        if site.deployment is None:
            print(f"fl-client: {site_yaml}: deployment.private_key: is needed to know where the "
                  "key goes (or use --name NAME --out DIR)", file=sys.stderr)
            return 2
        name, private = site.name, site.deployment.private_key
    else:
        if not SITE_NAME.match(name or ""):  # the name becomes a file name: no "../" escapes --out
            print(f"fl-client: --name {name!r} is not a valid site name: {SITE_NAME_RULE}",
                  file=sys.stderr)
            return 2
        private = Path(out or ".") / f"{name}_auth"
    try:
        private, public, line = write_key_pair(private, force=force)
    except FileExistsError as err:  # an input error like the others: exit 2
        print(f"fl-client: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"fl-client: {err}", file=sys.stderr)
        return 1
    print(f"fl-client: wrote {private} (private, 0600: never leaves this machine)")
    print(f"fl-client: wrote {public} (public):")
    print(line.decode().strip())
    print(f"fl-client: send {public.name} to the consortium operator, who runs\n"
          f"  fl-server add-site {name} --public-key {public.name} --consortium FILE\n"
          f"(or fl-server provision ... --public-key {name}={public.name})")
    return 0
