// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev The EIP-3009 call the collector makes (FiatTokenV2_2's `bytes signature` overload).
interface IERC3009Receive {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external;
}

/// @title ERC3009DepositCollector
/// @notice Test-only deposit collector of the x402 `batch-settlement` escrow, written from scratch
///         for the x402-tee-proxy test suite. The payer signs an EIP-3009
///         `ReceiveWithAuthorization` to this collector for the deposit amount, with nonce
///         `keccak256(abi.encode(channelId, salt))`; the escrow calls `collect`, which redeems the
///         authorization and forwards the tokens to the escrow. The nonce ties the signature to
///         one channel: it cannot fund another, and the token refuses it a second time.
/// @dev Placed with `anvil_setCode` at 0x4020806089470a89826cB9fB1f4059150b550004; no constructor,
///      no storage, the escrow's address is a constant.
contract ERC3009DepositCollector {
    address private constant _BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    error OnlyBatchSettlement();
    error TransferFailed();

    /// @notice The escrow, the only caller of `collect` and the receiver of what it collects.
    function BATCH_SETTLEMENT() external pure returns (address) {
        return _BATCH_SETTLEMENT;
    }

    /// @notice Move `amount` (atomic units) of `token` from `payer` to the escrow for channel
    ///         `channelId`. `data` = abi.encode(uint256 validAfter, uint256 validBefore,
    ///         uint256 salt, bytes signature). The token's own revert (expired, used, bad
    ///         signature) is passed on.
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data)
        external
    {
        if (msg.sender != _BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(data, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009Receive(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, signature
        );
        (bool ok, bytes memory answer) =
            token.call(abi.encodeWithSignature("transfer(address,uint256)", _BATCH_SETTLEMENT, amount));
        if (!ok || (answer.length != 0 && (answer.length < 32 || abi.decode(answer, (uint256)) != 1))) {
            revert TransferFailed();
        }
    }
}
