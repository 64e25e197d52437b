#!/usr/bin/env bash
# Compile the test contracts with solc 0.8.30 (solcjs, standard JSON) and write
# <Name>.json artifacts (abi, bytecode, deployedBytecode) next to the sources.
#
# Compiler resolution: $SOLCJS if set, else `solcjs` on PATH, else
# `npx --yes -p solc@0.8.30 solcjs`. Requires python3 for JSON handling.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

SOLC_VERSION="0.8.30"
EVM_VERSION="${EVM_VERSION:-cancun}"
CONTRACTS=(EIP3009Token ERC1271Wallet Permit2 x402UptoPermit2Proxy x402BatchSettlement ERC3009DepositCollector Permit2DepositCollector)

if [[ -n "${SOLCJS:-}" ]]; then
    SOLC_CMD=("$SOLCJS")
elif command -v solcjs >/dev/null 2>&1; then
    SOLC_CMD=(solcjs)
else
    SOLC_CMD=(npx --yes -p "solc@${SOLC_VERSION}" solcjs)
fi

have="$("${SOLC_CMD[@]}" --version 2>/dev/null | tail -n 1)"
case "$have" in
    "${SOLC_VERSION}"*) ;;
    *) echo "build.sh: expected solcjs ${SOLC_VERSION}, got '${have}'" >&2; exit 1 ;;
esac

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Standard-JSON input with the sources inlined.
python3 - "$EVM_VERSION" "${CONTRACTS[@]}" >"$tmp/input.json" <<'PY'
import json, sys
evm, names = sys.argv[1], sys.argv[2:]
print(json.dumps({
    "language": "Solidity",
    "sources": {f"{n}.sol": {"content": open(f"{n}.sol").read()} for n in names},
    "settings": {
        "optimizer": {"enabled": True, "runs": 200},
        "evmVersion": evm,
        "metadata": {"bytecodeHash": "none"},
        "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
    },
}))
PY

"${SOLC_CMD[@]}" --standard-json <"$tmp/input.json" >"$tmp/output.json"

python3 - "$SOLC_VERSION" "$tmp/output.json" "${CONTRACTS[@]}" <<'PY'
import json, sys
version, out_path, names = sys.argv[1], sys.argv[2], sys.argv[3:]
raw = open(out_path).read()
out = json.loads(raw[raw.index("{"):])  # tolerate any banner before the JSON
errors = [e for e in out.get("errors", []) if e.get("severity") == "error"]
for e in out.get("errors", []):
    print(e.get("formattedMessage", e.get("message")), file=sys.stderr)
if errors:
    sys.exit("build.sh: compilation failed")
for n in names:
    c = out["contracts"][f"{n}.sol"][n]
    art = {
        "contractName": n,
        "compiler": f"solc {version}",
        "abi": c["abi"],
        "bytecode": "0x" + c["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + c["evm"]["deployedBytecode"]["object"],
    }
    with open(f"{n}.json", "w") as f:
        json.dump(art, f, indent=2)
        f.write("\n")
    print(f"wrote {n}.json ({(len(art['deployedBytecode']) - 2) // 2} bytes runtime)")
PY
