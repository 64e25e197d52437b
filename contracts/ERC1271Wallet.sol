// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title ERC1271Wallet
/// @notice Minimal smart-contract "wallet" for tests of the EIP-1271 signature path.
/// @dev No constructor: it works both when deployed normally and when its runtime
///      code is injected with `anvil_setCode`. The owner is claimed once via
///      setOwner() while unset. setRefuse(true) makes every signature invalid.
///      Intentionally unprotected apart from the one-shot owner claim; test use only.
contract ERC1271Wallet {
    bytes4 private constant _MAGIC = 0x1626ba7e;
    bytes4 private constant _REJECT = 0xffffffff;

    address public owner;
    bool public refuse;

    event OwnerSet(address indexed owner);
    event RefuseSet(bool refuse);

    function setOwner(address newOwner) external {
        require(owner == address(0), "ERC1271Wallet: owner already set");
        require(newOwner != address(0), "ERC1271Wallet: zero owner");
        owner = newOwner;
        emit OwnerSet(newOwner);
    }

    function setRefuse(bool value) external {
        refuse = value;
        emit RefuseSet(value);
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (refuse || owner == address(0) || signature.length != 65) return _REJECT;
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (v < 27) v += 27;
        address signer = ecrecover(hash, v, r, s);
        return (signer != address(0) && signer == owner) ? _MAGIC : _REJECT;
    }

    /// @notice Lets the wallet forward arbitrary calls for its owner (e.g. token transfers).
    function execute(address target, bytes calldata data) external returns (bytes memory) {
        require(msg.sender == owner, "ERC1271Wallet: not owner");
        (bool ok, bytes memory ret) = target.call(data);
        if (!ok) {
            assembly {
                revert(add(ret, 0x20), mload(ret))
            }
        }
        return ret;
    }
}
