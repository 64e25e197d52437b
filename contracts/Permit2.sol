// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title Permit2
/// @notice Test-only stand-in for the signature-transfer half of Uniswap's canonical
///         Permit2, written from scratch for the x402-tee-proxy test suite. It follows
///         the published ISignatureTransfer interface, EIP-712 domain, type strings,
///         unordered-nonce bitmap and custom errors, so signatures made by the official
///         x402 clients for the real Permit2 verify here unchanged.
/// @dev The runtime bytecode is dropped at the canonical Permit2 address
///      (0x000000000022D473030F116dDEE9F6B43aC78BA3) with `anvil_setCode`, so there is no
///      constructor and no immutable: the domain separator is derived on every call
///      from block.chainid and address(this).
///      Not implemented: the AllowanceTransfer half (approve/permit/transferFrom with
///      packed allowances, lockdown) and the batch signature transfers. `allowance` is
///      kept as a getter that always reads zero, because nothing here ever writes it.
contract Permit2 {
    // ---------------------------------------------------------------------
    // Types (ISignatureTransfer)
    // ---------------------------------------------------------------------

    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    /// @dev Layout of the AllowanceTransfer getter; never written in this stand-in.
    struct PackedAllowance {
        uint160 amount;
        uint48 expiration;
        uint48 nonce;
    }

    // ---------------------------------------------------------------------
    // EIP-712 constants
    // ---------------------------------------------------------------------

    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)");
    bytes32 private constant _NAME_HASH = keccak256("Permit2");

    bytes32 private constant _TOKEN_PERMISSIONS_TYPEHASH = keccak256("TokenPermissions(address token,uint256 amount)");

    bytes32 private constant _PERMIT_TRANSFER_FROM_TYPEHASH = keccak256(
        "PermitTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline)"
        "TokenPermissions(address token,uint256 amount)"
    );

    /// @dev The caller's witness type string completes this prefix (it names the witness
    ///      field, closes the struct and appends the referenced type definitions).
    string private constant _WITNESS_TYPE_PREFIX =
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";

    /// @dev bytes4(keccak256("isValidSignature(bytes32,bytes)"))
    bytes4 private constant _ERC1271_MAGIC = 0x1626ba7e;

    /// @dev Clears the parity bit of the `vs` word of an EIP-2098 compact signature.
    bytes32 private constant _S_MASK = 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff;

    // ---------------------------------------------------------------------
    // Storage
    // ---------------------------------------------------------------------

    /// @notice owner => word position => bitmap of spent unordered nonces.
    mapping(address => mapping(uint256 => uint256)) public nonceBitmap;

    /// @notice AllowanceTransfer getter (owner => token => spender). Always zero here.
    mapping(address => mapping(address => mapping(address => PackedAllowance))) public allowance;

    // ---------------------------------------------------------------------
    // Events and errors (as published)
    // ---------------------------------------------------------------------

    event UnorderedNonceInvalidation(address indexed owner, uint256 word, uint256 mask);

    error SignatureExpired(uint256 signatureDeadline);
    error InvalidAmount(uint256 maxAmount);
    error InvalidNonce();
    error InvalidSignatureLength();
    error InvalidSignature();
    error InvalidSigner();
    error InvalidContractSignature();

    // ---------------------------------------------------------------------
    // EIP-712 domain
    // ---------------------------------------------------------------------

    /// @notice {name: "Permit2", chainId, verifyingContract}; no version field.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _NAME_HASH, block.chainid, address(this)));
    }

    // ---------------------------------------------------------------------
    // Signature transfers
    // ---------------------------------------------------------------------

    /// @notice Move `transferDetails.requestedAmount` (at most the permitted amount) of the
    ///         permitted token from `owner` to `transferDetails.to`; `msg.sender` must be the
    ///         spender the owner signed for.
    function permitTransferFrom(
        PermitTransferFrom memory permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes calldata signature
    ) external {
        bytes32 structHash = keccak256(
            abi.encode(
                _PERMIT_TRANSFER_FROM_TYPEHASH,
                _tokenPermissionsHash(permit.permitted),
                msg.sender,
                permit.nonce,
                permit.deadline
            )
        );
        _transfer(permit, transferDetails, owner, structHash, signature);
    }

    /// @notice As `permitTransferFrom`, with extra data (`witness`, the EIP-712 hash of the
    ///         caller's witness struct) covered by the owner's signature. `witnessTypeString`
    ///         is the rest of the primary type after the fixed prefix, e.g.
    ///         "Witness witness)TokenPermissions(address token,uint256 amount)Witness(...)".
    function permitWitnessTransferFrom(
        PermitTransferFrom memory permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        bytes32 typeHash = keccak256(abi.encodePacked(_WITNESS_TYPE_PREFIX, witnessTypeString));
        bytes32 structHash = keccak256(
            abi.encode(
                typeHash, _tokenPermissionsHash(permit.permitted), msg.sender, permit.nonce, permit.deadline, witness
            )
        );
        _transfer(permit, transferDetails, owner, structHash, signature);
    }

    /// @notice Spend (mark as used) every nonce of the caller whose bit is set in `mask`, in
    ///         word `wordPos` of the bitmap.
    function invalidateUnorderedNonces(uint256 wordPos, uint256 mask) external {
        nonceBitmap[msg.sender][wordPos] |= mask;
        emit UnorderedNonceInvalidation(msg.sender, wordPos, mask);
    }

    // ---------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------

    function _transfer(
        PermitTransferFrom memory permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 structHash,
        bytes calldata signature
    ) private {
        uint256 requested = transferDetails.requestedAmount;
        if (block.timestamp > permit.deadline) revert SignatureExpired(permit.deadline);
        if (requested > permit.permitted.amount) revert InvalidAmount(permit.permitted.amount);

        _spendNonce(owner, permit.nonce);

        bytes32 digest = keccak256(abi.encodePacked(hex"1901", DOMAIN_SEPARATOR(), structHash));
        _checkSignature(owner, digest, signature);

        _pull(permit.permitted.token, owner, transferDetails.to, requested);
    }

    function _tokenPermissionsHash(TokenPermissions memory permitted) private pure returns (bytes32) {
        return keccak256(abi.encode(_TOKEN_PERMISSIONS_TYPEHASH, permitted.token, permitted.amount));
    }

    /// @dev Nonce n lives in word n >> 8 at bit n & 0xff; a set bit means spent.
    function _spendNonce(address owner, uint256 nonce) private {
        uint256 bit = uint256(1) << (nonce & 0xff);
        uint256 word = nonceBitmap[owner][nonce >> 8];
        if (word & bit != 0) revert InvalidNonce();
        nonceBitmap[owner][nonce >> 8] = word | bit;
    }

    /// @dev Owners with code answer EIP-1271; others must have signed with ECDSA, as a
    ///      65-byte (r, s, v) or a 64-byte EIP-2098 (r, vs) signature.
    function _checkSignature(address owner, bytes32 digest, bytes calldata signature) private view {
        if (owner.code.length > 0) {
            (bool ok, bytes memory answer) =
                owner.staticcall(abi.encodeWithSelector(_ERC1271_MAGIC, digest, signature));
            if (!ok) {
                assembly {
                    revert(add(answer, 0x20), mload(answer))
                }
            }
            if (answer.length < 32 || abi.decode(answer, (bytes32)) != bytes32(_ERC1271_MAGIC)) {
                revert InvalidContractSignature();
            }
            return;
        }

        bytes32 r;
        bytes32 s;
        uint8 v;
        if (signature.length == 65) {
            r = bytes32(signature[0:32]);
            s = bytes32(signature[32:64]);
            v = uint8(signature[64]);
        } else if (signature.length == 64) {
            r = bytes32(signature[0:32]);
            bytes32 vs = bytes32(signature[32:64]);
            s = vs & _S_MASK;
            v = uint8(uint256(vs) >> 255) + 27;
        } else {
            revert InvalidSignatureLength();
        }

        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
        if (signer != owner) revert InvalidSigner();
    }

    /// @dev ERC-20 transferFrom that accepts tokens returning nothing or `true`, and reverts
    ///      with "TRANSFER_FROM_FAILED" otherwise (the token's own reason is not passed on).
    function _pull(address token, address from, address to, uint256 amount) private {
        (bool ok, bytes memory answer) =
            token.call(abi.encodeWithSignature("transferFrom(address,address,uint256)", from, to, amount));
        bool accepted = ok && (answer.length == 0 || (answer.length >= 32 && abi.decode(answer, (uint256)) == 1));
        require(accepted, "TRANSFER_FROM_FAILED");
    }
}
