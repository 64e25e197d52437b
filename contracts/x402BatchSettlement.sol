// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev The two ERC-20 calls the escrow makes itself.
interface IERC20Balance {
    function balanceOf(address account) external view returns (uint256);
    function transfer(address to, uint256 value) external returns (bool);
}

/// @dev Our internal interface between the escrow and its deposit collectors (not part of the
///      published ABI): move `amount` of `token` from `payer` to the escrow, authorized by `data`
///      for channel `channelId`. Only the escrow may call it.
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external;
}

/// @title x402BatchSettlement
/// @notice Test-only stand-in for the x402 `batch-settlement` escrow, written from scratch for the
///         x402-tee-proxy test suite after the published interface (the ABI, EIP-712 domain and type
///         strings of PyPI `x402` 2.25, `x402/mechanisms/evm/batch_settlement`). A payer funds a
///         channel (deposit through one of the two canonical collectors) and signs cumulative vouchers
///         off chain; the receiver's authorizer claims against them in batches, claimed money is swept
///         to the receiver with `settle`, and the payer gets the unclaimed rest back by a refund from
///         the receiver's side or a delayed withdrawal.
/// @dev Placed with `anvil_setCode` at 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003, so there is no
///      constructor and no immutable: the EIP-712 domain separator is derived on every call from
///      block.chainid and address(this), and the collectors' addresses are constants. Amounts are
///      token atomic units, times unix seconds.
contract x402BatchSettlement {
    // ---------------------------------------------------------------------
    // Types (published)
    // ---------------------------------------------------------------------

    /// @notice The immutable identity of a channel; its id is the EIP-712 digest of this struct.
    struct ChannelConfig {
        address payer;
        address payerAuthorizer; // signs vouchers; zero: the payer itself, checked with EIP-1271
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay; // seconds
        bytes32 salt;
    }

    /// @notice The payer's promise that the receiver may claim up to `maxClaimableAmount` in total.
    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    /// @notice A signed voucher and the cumulative total the receiver claims with it.
    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    struct ChannelState {
        uint128 balance; // deposited, minus withdrawn and refunded
        uint128 totalClaimed; // cumulative, never above balance
    }

    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverTotals {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    // ---------------------------------------------------------------------
    // Constants
    // ---------------------------------------------------------------------

    address private constant _ERC3009_COLLECTOR = 0x4020806089470a89826cB9fB1f4059150b550004;
    address private constant _PERMIT2_COLLECTOR = 0x4020425FAf3B746C082C2f942b4E5159887B0005;

    uint40 private constant _MIN_WITHDRAW_DELAY = 900; // 15 minutes
    uint40 private constant _MAX_WITHDRAW_DELAY = 2_592_000; // 30 days

    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant _NAME_HASH = keccak256("x402 Batch Settlement");
    bytes32 private constant _VERSION_HASH = keccak256("1");

    bytes32 private constant _CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
        "address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 private constant _VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 private constant _REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 private constant _CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 private constant _CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    /// @dev bytes4(keccak256("isValidSignature(bytes32,bytes)"))
    bytes4 private constant _ERC1271_MAGIC = 0x1626ba7e;

    /// @dev Upper bound for the `s` part of a canonical secp256k1 signature (n / 2).
    uint256 private constant _HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    // ---------------------------------------------------------------------
    // Storage (published getters)
    // ---------------------------------------------------------------------

    /// @notice channel id => (balance, totalClaimed).
    mapping(bytes32 => ChannelState) public channels;

    /// @notice channel id => (amount, initiatedAt); initiatedAt 0 means none pending.
    mapping(bytes32 => PendingWithdrawal) public pendingWithdrawals;

    /// @notice receiver => token => (totalClaimed, totalSettled), summed over all its channels.
    mapping(address => mapping(address => ReceiverTotals)) public receivers;

    /// @notice channel id => the nonce the next `refundWithSignature` must carry.
    mapping(bytes32 => uint256) public refundNonce;

    bool private transient _locked;

    // ---------------------------------------------------------------------
    // Events (`Settled` as published; the others are this contract's own)
    // ---------------------------------------------------------------------

    event Deposited(
        bytes32 indexed channelId, address indexed payer, address indexed collector, uint128 amount, uint128 balance
    );
    event Claimed(
        bytes32 indexed channelId, address indexed receiver, address indexed token, uint128 totalClaimed, uint128 delta
    );
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 finalizableAt);
    event WithdrawCanceled(bytes32 indexed channelId);
    event Withdrawn(bytes32 indexed channelId, address indexed payer, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed payer, address indexed sender, uint128 amount);

    // ---------------------------------------------------------------------
    // Errors
    // ---------------------------------------------------------------------

    error ZeroAmount();
    error InvalidChannelConfig();
    error WithdrawDelayOutOfRange(uint40 withdrawDelay);
    error UnknownCollector(address collector);
    error DepositAmountMismatch(uint256 expected, uint256 received);
    error EmptyClaims();
    error NotReceiverAuthorizer();
    error AuthorizerMismatch(uint256 index);
    error InvalidAuthorizerSignature();
    error ClaimExceedsVoucher(bytes32 channelId, uint128 totalClaimed, uint128 maxClaimableAmount);
    error ClaimExceedsBalance(bytes32 channelId, uint128 totalClaimed, uint128 balance);
    error InvalidVoucherSignature(bytes32 channelId);
    error NotPayer();
    error NotReceiver();
    error NothingToWithdraw();
    error NoPendingWithdrawal();
    error WithdrawNotReady(uint256 finalizableAt);
    error NothingToRefund();
    error InvalidRefundNonce(uint256 expected, uint256 nonce);
    error TransferFailed();
    error ReentrancyGuardReentrantCall();

    modifier nonReentrant() {
        if (_locked) revert ReentrancyGuardReentrantCall();
        _locked = true;
        _;
        _locked = false;
    }

    // ---------------------------------------------------------------------
    // Multicall
    // ---------------------------------------------------------------------

    /// @notice Run each call of `data` on this contract (delegatecall to itself, so `msg.sender`
    ///         stays the caller) in order; the first failure reverts all with its own revert data.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; i++) {
            (bool ok, bytes memory answer) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly {
                    revert(add(answer, 0x20), mload(answer))
                }
            }
            results[i] = answer;
        }
    }

    // ---------------------------------------------------------------------
    // Deposits
    // ---------------------------------------------------------------------

    /// @notice Add `amount` to the channel `config` describes, pulled from the payer by `collector`
    ///         (the ERC-3009 or the Permit2 deposit collector) with the payer's signature in
    ///         `collectorData`. Anyone may submit it. Cancels a pending withdrawal of the channel.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        if (amount == 0) revert ZeroAmount();
        if (
            config.payer == address(0) || config.receiver == address(0) || config.receiverAuthorizer == address(0)
                || config.token == address(0)
        ) revert InvalidChannelConfig();
        if (config.withdrawDelay < _MIN_WITHDRAW_DELAY || config.withdrawDelay > _MAX_WITHDRAW_DELAY) {
            revert WithdrawDelayOutOfRange(config.withdrawDelay);
        }
        if (collector != _ERC3009_COLLECTOR && collector != _PERMIT2_COLLECTOR) revert UnknownCollector(collector);

        bytes32 channelId = getChannelId(config);
        IERC20Balance token = IERC20Balance(config.token);
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, channelId, collectorData);
        uint256 received = token.balanceOf(address(this)) - before;
        if (received != amount) revert DepositAmountMismatch(amount, received);

        ChannelState storage channel = channels[channelId];
        uint128 balance = channel.balance + amount;
        channel.balance = balance;
        if (pendingWithdrawals[channelId].initiatedAt != 0) {
            delete pendingWithdrawals[channelId];
            emit WithdrawCanceled(channelId);
        }
        emit Deposited(channelId, config.payer, collector, amount, balance);
    }

    // ---------------------------------------------------------------------
    // Claims and settlement
    // ---------------------------------------------------------------------

    /// @notice Claim vouchers as the receiver's authorizer: `msg.sender` must be every claim's
    ///         `receiverAuthorizer`. See `_claim` for the rules of one claim.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyClaims();
        for (uint256 i = 0; i < n; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            if (c.voucher.channel.receiverAuthorizer != msg.sender) revert NotReceiverAuthorizer();
            _claim(c, getChannelId(c.voucher.channel));
        }
    }

    /// @notice Claim vouchers on the strength of the receiver authorizer's EIP-712 signature over
    ///         `ClaimBatch(ClaimEntry[] claims)`; anyone may submit. All claims must name the same
    ///         `receiverAuthorizer`, the signer.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyClaims();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        bytes32[] memory ids = new bytes32[](n);
        bytes32[] memory entries = new bytes32[](n);
        for (uint256 i = 0; i < n; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            if (c.voucher.channel.receiverAuthorizer != authorizer) revert AuthorizerMismatch(i);
            ids[i] = getChannelId(c.voucher.channel);
            entries[i] = keccak256(
                abi.encode(_CLAIM_ENTRY_TYPEHASH, ids[i], c.voucher.maxClaimableAmount, c.totalClaimed)
            );
        }
        bytes32 digest = _typedDigest(keccak256(abi.encode(_CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
        if (!_isValidSignature(authorizer, digest, authorizerSignature)) revert InvalidAuthorizerSignature();
        for (uint256 i = 0; i < n; i++) {
            _claim(voucherClaims[i], ids[i]);
        }
    }

    /// @notice Send the receiver everything claimed for it in `token` and not yet sent. Anyone may
    ///         call; the money only ever goes to `receiver`. Nothing outstanding: a no-op.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverTotals storage totals = receivers[receiver][token];
        uint128 claimed = totals.totalClaimed;
        uint128 amount = claimed - totals.totalSettled;
        if (amount == 0) return;
        totals.totalSettled = claimed;
        _send(token, receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ---------------------------------------------------------------------
    // Withdrawals (payer side, delayed)
    // ---------------------------------------------------------------------

    /// @notice Ask for `amount` of the channel back; payable by `finalizeWithdraw` once
    ///         `withdrawDelay` seconds have passed. Payer or payer authorizer only. A new request
    ///         replaces a pending one and restarts its delay.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        _onlyPayer(config);
        if (amount == 0) revert ZeroAmount();
        bytes32 channelId = getChannelId(config);
        ChannelState storage channel = channels[channelId];
        if (channel.balance == channel.totalClaimed) revert NothingToWithdraw();
        pendingWithdrawals[channelId] = PendingWithdrawal(amount, uint40(block.timestamp));
        emit WithdrawInitiated(channelId, config.payer, amount, block.timestamp + config.withdrawDelay);
    }

    /// @notice Pay out a pending withdrawal whose delay has passed: the requested amount, but no
    ///         more than is unclaimed now (claims landed meanwhile come first). Anyone may call;
    ///         the money goes to the payer.
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        bytes32 channelId = getChannelId(config);
        PendingWithdrawal memory pending = pendingWithdrawals[channelId];
        if (pending.initiatedAt == 0) revert NoPendingWithdrawal();
        uint256 finalizableAt = uint256(pending.initiatedAt) + config.withdrawDelay;
        if (block.timestamp < finalizableAt) revert WithdrawNotReady(finalizableAt);
        delete pendingWithdrawals[channelId];

        ChannelState storage channel = channels[channelId];
        uint128 available = channel.balance - channel.totalClaimed;
        uint128 amount = pending.amount < available ? pending.amount : available;
        channel.balance -= amount;
        if (amount != 0) _send(config.token, config.payer, amount);
        emit Withdrawn(channelId, config.payer, amount);
    }

    // ---------------------------------------------------------------------
    // Refunds (receiver side, immediate)
    // ---------------------------------------------------------------------

    /// @notice Return up to `amount` of the unclaimed balance to the payer at once. The receiver or
    ///         its authorizer only.
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert NotReceiver();
        _refund(config, getChannelId(config), amount);
    }

    /// @notice As `refund`, on the strength of the receiver authorizer's EIP-712 signature over
    ///         `Refund(channelId, nonce, amount)`; anyone may submit. `nonce` must be
    ///         `refundNonce[channelId]`, which then goes up by one.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 channelId = getChannelId(config);
        uint256 expected = refundNonce[channelId];
        if (nonce != expected) revert InvalidRefundNonce(expected, nonce);
        bytes32 digest = getRefundDigest(channelId, nonce, amount);
        if (!_isValidSignature(config.receiverAuthorizer, digest, receiverAuthorizerSignature)) {
            revert InvalidAuthorizerSignature();
        }
        refundNonce[channelId] = expected + 1;
        _refund(config, channelId, amount);
    }

    // ---------------------------------------------------------------------
    // Views
    // ---------------------------------------------------------------------

    /// @notice {name: "x402 Batch Settlement", version: "1", chainId, verifyingContract}.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _NAME_HASH, _VERSION_HASH, block.chainid, address(this)));
    }

    /// @notice The channel id: the full EIP-712 digest of `config` in this contract's domain.
    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _typedDigest(
            keccak256(
                abi.encode(
                    _CHANNEL_CONFIG_TYPEHASH,
                    config.payer,
                    config.payerAuthorizer,
                    config.receiver,
                    config.receiverAuthorizer,
                    config.token,
                    config.withdrawDelay,
                    config.salt
                )
            )
        );
    }

    /// @notice The digest a voucher signature signs.
    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _typedDigest(keccak256(abi.encode(_VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    /// @notice The digest a `refundWithSignature` signature signs.
    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _typedDigest(keccak256(abi.encode(_REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    /// @notice The digest a `claimWithSignature` signature signs for `voucherClaims`.
    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) external view returns (bytes32) {
        uint256 n = voucherClaims.length;
        bytes32[] memory entries = new bytes32[](n);
        for (uint256 i = 0; i < n; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(
                    _CLAIM_ENTRY_TYPEHASH, getChannelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed
                )
            );
        }
        return _typedDigest(keccak256(abi.encode(_CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    // ---------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------

    /// @dev One claim: totalClaimed <= maxClaimableAmount, else revert; not above the channel's
    ///      current totalClaimed: skipped (a stale entry must not sink its batch); above the
    ///      balance: revert; then the voucher signature is checked and the increase credited to
    ///      the receiver.
    function _claim(VoucherClaim calldata c, bytes32 channelId) private {
        uint128 total = c.totalClaimed;
        uint128 maxClaimable = c.voucher.maxClaimableAmount;
        if (total > maxClaimable) revert ClaimExceedsVoucher(channelId, total, maxClaimable);
        ChannelState storage channel = channels[channelId];
        uint128 previous = channel.totalClaimed;
        if (total <= previous) return;
        uint128 balance = channel.balance;
        if (total > balance) revert ClaimExceedsBalance(channelId, total, balance);

        ChannelConfig calldata config = c.voucher.channel;
        bytes32 digest = getVoucherDigest(channelId, maxClaimable);
        // payerAuthorizer zero: the payer signs, checked as SignatureChecker does (EIP-1271 for an
        // address with code, strict ECDSA otherwise)
        bool valid = config.payerAuthorizer != address(0)
            ? _recover(digest, c.signature) == config.payerAuthorizer
            : _isValidSignature(config.payer, digest, c.signature);
        if (!valid) revert InvalidVoucherSignature(channelId);

        channel.totalClaimed = total;
        uint128 delta = total - previous;
        receivers[config.receiver][config.token].totalClaimed += delta;
        emit Claimed(channelId, config.receiver, config.token, total, delta);
    }

    /// @dev Pays min(amount, balance - totalClaimed) to the payer; reverts when that is zero.
    function _refund(ChannelConfig calldata config, bytes32 channelId, uint128 amount) private {
        if (amount == 0) revert ZeroAmount();
        ChannelState storage channel = channels[channelId];
        uint128 available = channel.balance - channel.totalClaimed;
        uint128 paid = amount < available ? amount : available;
        if (paid == 0) revert NothingToRefund();
        channel.balance -= paid;
        _send(config.token, config.payer, paid);
        emit Refunded(channelId, config.payer, msg.sender, paid);
    }

    function _onlyPayer(ChannelConfig calldata config) private view {
        if (msg.sender != config.payer && (config.payerAuthorizer == address(0) || msg.sender != config.payerAuthorizer))
        {
            revert NotPayer();
        }
    }

    function _typedDigest(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked(hex"1901", DOMAIN_SEPARATOR(), structHash));
    }

    /// @dev A signer with code answers EIP-1271; otherwise strict ECDSA.
    function _isValidSignature(address signer, bytes32 digest, bytes calldata signature) private view returns (bool) {
        if (signer.code.length > 0) return _isValidERC1271(signer, digest, signature);
        return signer != address(0) && _recover(digest, signature) == signer;
    }

    function _isValidERC1271(address signer, bytes32 digest, bytes calldata signature) private view returns (bool) {
        if (signer.code.length == 0) return false;
        (bool ok, bytes memory answer) =
            signer.staticcall(abi.encodeWithSelector(_ERC1271_MAGIC, digest, signature));
        return ok && answer.length >= 32 && abi.decode(answer, (bytes32)) == bytes32(_ERC1271_MAGIC);
    }

    /// @dev Strict ECDSA: 65 bytes (r, s, v), v in {27, 28}, low s; address(0) for anything else.
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > _HALF_ORDER || (v != 27 && v != 28)) return address(0);
        return ecrecover(digest, v, r, s);
    }

    /// @dev ERC-20 transfer that accepts tokens returning nothing or `true`.
    function _send(address token, address to, uint256 amount) private {
        (bool ok, bytes memory answer) = token.call(abi.encodeCall(IERC20Balance.transfer, (to, amount)));
        if (!ok || (answer.length != 0 && (answer.length < 32 || abi.decode(answer, (uint256)) != 1))) {
            revert TransferFailed();
        }
    }
}
