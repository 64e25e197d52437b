// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev The part of Permit2's ISignatureTransfer interface the proxy calls.
interface ISignatureTransfer {
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

/// @dev EIP-2612 `permit`, the only token call the proxy makes itself.
interface IERC20PermitLike {
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;
}

/// @title x402UptoPermit2Proxy
/// @notice Test-only stand-in for the x402 `upto` settlement proxy, written from scratch for
///         the x402-tee-proxy test suite after the published interface (x402 spec
///         `scheme_upto_evm.md`, the official SDKs' ABI and witness types). The payer signs a
///         Permit2 `PermitWitnessTransferFrom` with this contract as spender, for a maximum
///         amount and a witness {to, facilitator, validAfter}; the facilitator named in the
///         witness settles any amount up to that maximum, always to `witness.to`.
/// @dev Placed with `anvil_setCode` at 0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002, so there is
///      no constructor: the Permit2 address (an immutable constructor argument upstream) is a
///      constant, the canonical 0x000000000022D473030F116dDEE9F6B43aC78BA3. The reentrancy
///      lock lives in transient storage (EIP-1153), which needs no initialisation either.
contract x402UptoPermit2Proxy {
    // ---------------------------------------------------------------------
    // Types
    // ---------------------------------------------------------------------

    /// @notice What the payer binds beside the permit: where the money goes, who may settle
    ///         it, and from when. The upper time bound is the permit's own deadline.
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    /// @notice An EIP-2612 permit of the token, with Permit2 as spender.
    struct EIP2612Permit {
        uint256 value;
        uint256 deadline;
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    // ---------------------------------------------------------------------
    // Constants
    // ---------------------------------------------------------------------

    address private constant _PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;

    /// @notice The tail Permit2 appends to "PermitWitnessTransferFrom(TokenPermissions permitted,
    ///         address spender,uint256 nonce,uint256 deadline," to form the signed primary type.
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");

    // ---------------------------------------------------------------------
    // Transient state
    // ---------------------------------------------------------------------

    bool private transient _locked;

    // ---------------------------------------------------------------------
    // Events and errors (as published)
    // ---------------------------------------------------------------------

    event Settled();
    event SettledWithPermit();
    event EIP2612PermitFailedWithReason(address indexed token, address indexed owner, string reason);
    event EIP2612PermitFailedWithPanic(address indexed token, address indexed owner, uint256 errorCode);
    event EIP2612PermitFailedWithData(address indexed token, address indexed owner, bytes data);

    error AmountExceedsPermitted();
    error UnauthorizedFacilitator();
    error InvalidAmount();
    error InvalidOwner();
    error InvalidDestination();
    error PaymentTooEarly();
    error Permit2612AmountMismatch();
    error ReentrancyGuardReentrantCall();

    modifier nonReentrant() {
        if (_locked) revert ReentrancyGuardReentrantCall();
        _locked = true;
        _;
        _locked = false;
    }

    // ---------------------------------------------------------------------
    // Views
    // ---------------------------------------------------------------------

    /// @notice The Permit2 contract this proxy spends through.
    function PERMIT2() external pure returns (ISignatureTransfer) {
        return ISignatureTransfer(_PERMIT2);
    }

    // ---------------------------------------------------------------------
    // Settlement
    // ---------------------------------------------------------------------

    /// @notice Move `amount` (0 < amount <= permit.permitted.amount) of the permitted token from
    ///         `owner` to `witness.to`. Only `witness.facilitator` may call.
    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _checkCaller(permit, amount, witness);
        _pullThroughPermit2(permit, amount, owner, witness, signature);
        emit Settled();
    }

    /// @notice As `settle`, after first submitting the payer's EIP-2612 permit that lets Permit2
    ///         spend the token. The permit's value must equal the Permit2 permitted amount; a
    ///         permit the token refuses (already used, or an allowance already in place) is
    ///         reported in an event and settlement goes on with the allowance there is.
    function settleWithPermit(
        EIP2612Permit calldata permit2612,
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _checkCaller(permit, amount, witness);
        _submitPermit(permit.permitted.token, owner, permit2612, permit.permitted.amount);
        _pullThroughPermit2(permit, amount, owner, witness, signature);
        emit SettledWithPermit();
    }

    // ---------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------

    function _checkCaller(ISignatureTransfer.PermitTransferFrom calldata permit, uint256 amount, Witness calldata witness)
        private
        view
    {
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
    }

    function _pullThroughPermit2(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) private {
        if (amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();

        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        ISignatureTransfer(_PERMIT2).permitWitnessTransferFrom(
            permit,
            ISignatureTransfer.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
    }

    function _submitPermit(address token, address owner, EIP2612Permit calldata p, uint256 permittedAmount) private {
        if (p.value != permittedAmount) revert Permit2612AmountMismatch();
        try IERC20PermitLike(token).permit(owner, _PERMIT2, p.value, p.deadline, p.v, p.r, p.s) {}
        catch Error(string memory reason) {
            emit EIP2612PermitFailedWithReason(token, owner, reason);
        } catch Panic(uint256 errorCode) {
            emit EIP2612PermitFailedWithPanic(token, owner, errorCode);
        } catch (bytes memory data) {
            emit EIP2612PermitFailedWithData(token, owner, data);
        }
    }
}
