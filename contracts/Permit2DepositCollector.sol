// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev The part of Permit2's ISignatureTransfer interface the collector calls.
interface ISignatureTransferDeposit {
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

    function permitWitnessTransferFrom(
        PermitTransferFrom memory permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

/// @title Permit2DepositCollector
/// @notice Test-only deposit collector of the x402 `batch-settlement` escrow, written from scratch
///         for the x402-tee-proxy test suite. The payer signs a Permit2 `PermitWitnessTransferFrom`
///         with this collector as spender, `permitted.amount` = the deposit, and the witness
///         `DepositWitness(bytes32 channelId)`; the escrow calls `collect`, which has Permit2 move
///         the tokens from the payer straight to the escrow. Optionally an EIP-2612 permit (payer →
///         Permit2) is submitted first, so the payer needs no approval transaction.
/// @dev Placed with `anvil_setCode` at 0x4020425FAf3B746C082C2f942b4E5159887B0005; no constructor,
///      no storage, the escrow and Permit2 addresses are constants.
contract Permit2DepositCollector {
    address private constant _BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
    address private constant _PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;

    /// @notice keccak256("DepositWitness(bytes32 channelId)")
    bytes32 public constant WITNESS_TYPEHASH = keccak256("DepositWitness(bytes32 channelId)");

    /// @notice The tail Permit2 appends to "PermitWitnessTransferFrom(TokenPermissions permitted,
    ///         address spender,uint256 nonce,uint256 deadline," (referenced types in alphabetical order).
    string public constant WITNESS_TYPE_STRING =
        "DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)";

    error OnlyBatchSettlement();

    /// @notice The escrow, the only caller of `collect` and the receiver of what it collects.
    function BATCH_SETTLEMENT() external pure returns (address) {
        return _BATCH_SETTLEMENT;
    }

    /// @notice The Permit2 contract the collector spends through.
    function PERMIT2() external pure returns (address) {
        return _PERMIT2;
    }

    /// @notice Move `amount` (atomic units) of `token` from `payer` to the escrow for channel
    ///         `channelId`. `data` = abi.encode(uint256 nonce, uint256 deadline, bytes
    ///         permit2Signature, bytes eip2612Permit); a non-empty `eip2612Permit` is
    ///         abi.encode(uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s), submitted
    ///         as `token.permit(payer, Permit2, ...)` first, its failure ignored (it may have been
    ///         used already by someone else; the Permit2 transfer then decides). Permit2's errors
    ///         pass through.
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data)
        external
    {
        if (msg.sender != _BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 nonce, uint256 deadline, bytes memory permit2Signature, bytes memory eip2612Permit) =
            abi.decode(data, (uint256, uint256, bytes, bytes));

        if (eip2612Permit.length != 0) _tryPermit(token, payer, eip2612Permit);

        ISignatureTransferDeposit(_PERMIT2).permitWitnessTransferFrom(
            ISignatureTransferDeposit.PermitTransferFrom({
                permitted: ISignatureTransferDeposit.TokenPermissions({token: token, amount: amount}),
                nonce: nonce,
                deadline: deadline
            }),
            ISignatureTransferDeposit.SignatureTransferDetails({to: _BATCH_SETTLEMENT, requestedAmount: amount}),
            payer,
            keccak256(abi.encode(WITNESS_TYPEHASH, channelId)),
            WITNESS_TYPE_STRING,
            permit2Signature
        );
    }

    /// @dev Submit the payer's EIP-2612 permit (spender Permit2) and ignore the outcome: a front-run
    ///      or stale permit must not block a deposit that the allowance already covers.
    function _tryPermit(address token, address payer, bytes memory eip2612Permit) private {
        (uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s) =
            abi.decode(eip2612Permit, (uint256, uint256, uint8, bytes32, bytes32));
        (bool accepted,) = token.call(
            abi.encodeWithSignature(
                "permit(address,address,uint256,uint256,uint8,bytes32,bytes32)", payer, _PERMIT2, value, deadline, v, r, s
            )
        );
        accepted; // deliberately unused
    }
}
