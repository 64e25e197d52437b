// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title EIP3009Token
/// @notice Test-only ERC-20 with EIP-3009 authorizations, shaped after the public
///         interface of USDC on Base (FiatTokenV2_2). Written from scratch for the
///         x402-tee-proxy test suite.
/// @dev The runtime bytecode is meant to be dropped at the Base USDC address with
///      `anvil_setCode`, so nothing may depend on a constructor or on immutables:
///      name/symbol/version are constants and the EIP-712 domain separator is
///      derived on every call from block.chainid and address(this).
///      All admin-style controls (mint, pause, blacklist) are open to anyone.
contract EIP3009Token {
    // ---------------------------------------------------------------------
    // Constants
    // ---------------------------------------------------------------------

    string private constant _NAME = "USD Coin";
    string private constant _SYMBOL = "USDC";
    string private constant _VERSION = "2";
    uint8 private constant _DECIMALS = 6;

    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");

    bytes32 public constant TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    bytes32 public constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    bytes32 public constant CANCEL_AUTHORIZATION_TYPEHASH =
        keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    /// @dev Upper bound for the `s` part of a canonical secp256k1 signature (n / 2).
    uint256 private constant _HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    /// @dev bytes4(keccak256("isValidSignature(bytes32,bytes)"))
    bytes4 private constant _ERC1271_OK = 0x1626ba7e;

    // ---------------------------------------------------------------------
    // Storage
    // ---------------------------------------------------------------------

    uint256 private _supply;
    bool private _isPaused;
    mapping(address => uint256) private _balances;
    mapping(address => mapping(address => uint256)) private _allowances;
    mapping(address => bool) private _blocked;
    mapping(address => mapping(bytes32 => bool)) private _nonceSpent;

    // ---------------------------------------------------------------------
    // Events
    // ---------------------------------------------------------------------

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);
    event Mint(address indexed minter, address indexed to, uint256 amount);
    event Pause();
    event Unpause();
    event Blacklisted(address indexed account);
    event UnBlacklisted(address indexed account);

    // ---------------------------------------------------------------------
    // Modifiers
    // ---------------------------------------------------------------------

    modifier whenNotPaused() {
        require(!_isPaused, "Pausable: paused");
        _;
    }

    modifier notBlacklisted(address account) {
        require(!_blocked[account], "Blacklistable: account is blacklisted");
        _;
    }

    // ---------------------------------------------------------------------
    // Metadata
    // ---------------------------------------------------------------------

    function name() external pure returns (string memory) {
        return _NAME;
    }

    function symbol() external pure returns (string memory) {
        return _SYMBOL;
    }

    function version() external pure returns (string memory) {
        return _VERSION;
    }

    function decimals() external pure returns (uint8) {
        return _DECIMALS;
    }

    /// @notice EIP-712 domain separator, recomputed for the current chain and address.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(
            abi.encode(
                _DOMAIN_TYPEHASH,
                keccak256(bytes(_NAME)),
                keccak256(bytes(_VERSION)),
                block.chainid,
                address(this)
            )
        );
    }

    // ---------------------------------------------------------------------
    // ERC-20 views
    // ---------------------------------------------------------------------

    function totalSupply() external view returns (uint256) {
        return _supply;
    }

    function balanceOf(address account) external view returns (uint256) {
        return _balances[account];
    }

    function allowance(address owner, address spender) external view returns (uint256) {
        return _allowances[owner][spender];
    }

    // ---------------------------------------------------------------------
    // ERC-20 mutators
    // ---------------------------------------------------------------------

    function transfer(address to, uint256 value)
        external
        whenNotPaused
        notBlacklisted(msg.sender)
        notBlacklisted(to)
        returns (bool)
    {
        _move(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value)
        external
        whenNotPaused
        notBlacklisted(msg.sender)
        notBlacklisted(spender)
        returns (bool)
    {
        _setAllowance(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value)
        external
        whenNotPaused
        notBlacklisted(msg.sender)
        notBlacklisted(from)
        notBlacklisted(to)
        returns (bool)
    {
        uint256 current = _allowances[from][msg.sender];
        require(value <= current, "ERC20: transfer amount exceeds allowance");
        if (current != type(uint256).max) {
            _setAllowance(from, msg.sender, current - value);
        }
        _move(from, to, value);
        return true;
    }

    // ---------------------------------------------------------------------
    // EIP-3009
    // ---------------------------------------------------------------------

    /// @notice Whether `nonce` of `authorizer` has already been used or canceled.
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool) {
        return _nonceSpent[authorizer][nonce];
    }

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external whenNotPaused notBlacklisted(from) notBlacklisted(to) {
        _transferAuth(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, _pack(v, r, s)
        );
    }

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external whenNotPaused notBlacklisted(from) notBlacklisted(to) {
        _transferAuth(TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature);
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external whenNotPaused notBlacklisted(from) notBlacklisted(to) {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferAuth(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, _pack(v, r, s)
        );
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external whenNotPaused notBlacklisted(from) notBlacklisted(to) {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferAuth(RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature);
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s)
        external
        whenNotPaused
    {
        _cancelAuth(authorizer, nonce, _pack(v, r, s));
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, bytes memory signature) external whenNotPaused {
        _cancelAuth(authorizer, nonce, signature);
    }

    // ---------------------------------------------------------------------
    // EIP-2612 (same EIP-712 domain as EIP-3009: "USD Coin", version "2")
    // ---------------------------------------------------------------------

    bytes32 public constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");

    /// @dev Declared after every earlier state variable, so the existing slots do not move.
    mapping(address => uint256) private _permitNonces;

    /// @notice The next EIP-2612 nonce of `owner`.
    function nonces(address owner) external view returns (uint256) {
        return _permitNonces[owner];
    }

    /// @notice Set `spender`'s allowance over `owner`'s tokens to `value`, by `owner`'s signature.
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        whenNotPaused
        notBlacklisted(owner)
        notBlacklisted(spender)
    {
        _permit(owner, spender, value, deadline, _pack(v, r, s));
    }

    function permit(address owner, address spender, uint256 value, uint256 deadline, bytes memory signature)
        external
        whenNotPaused
        notBlacklisted(owner)
        notBlacklisted(spender)
    {
        _permit(owner, spender, value, deadline, signature);
    }

    /// @dev A deadline of type(uint256).max never expires; otherwise it is valid up to and
    ///      including `deadline`. The nonce is consumed only by a valid permit.
    function _permit(address owner, address spender, uint256 value, uint256 deadline, bytes memory signature)
        private
    {
        require(deadline == type(uint256).max || deadline >= block.timestamp, "FiatTokenV2: permit is expired");
        uint256 nonce = _permitNonces[owner];
        bytes32 structHash = keccak256(abi.encode(PERMIT_TYPEHASH, owner, spender, value, nonce, deadline));
        require(_signedBy(owner, _digest(structHash), signature), "EIP2612: invalid signature");
        _permitNonces[owner] = nonce + 1;
        _setAllowance(owner, spender, value);
    }

    // ---------------------------------------------------------------------
    // Test controls (deliberately unrestricted)
    // ---------------------------------------------------------------------

    function mint(address to, uint256 amount) external returns (bool) {
        require(to != address(0), "FiatToken: mint to the zero address");
        _supply += amount;
        _balances[to] += amount;
        emit Mint(msg.sender, to, amount);
        emit Transfer(address(0), to, amount);
        return true;
    }

    function paused() external view returns (bool) {
        return _isPaused;
    }

    function pause() external {
        _isPaused = true;
        emit Pause();
    }

    function unpause() external {
        _isPaused = false;
        emit Unpause();
    }

    function isBlacklisted(address account) external view returns (bool) {
        return _blocked[account];
    }

    function blacklist(address account) external {
        _blocked[account] = true;
        emit Blacklisted(account);
    }

    function unBlacklist(address account) external {
        _blocked[account] = false;
        emit UnBlacklisted(account);
    }

    // ---------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------

    function _move(address from, address to, uint256 value) private {
        require(from != address(0), "ERC20: transfer from the zero address");
        require(to != address(0), "ERC20: transfer to the zero address");
        uint256 fromBal = _balances[from];
        require(value <= fromBal, "ERC20: transfer amount exceeds balance");
        unchecked {
            _balances[from] = fromBal - value;
        }
        _balances[to] += value;
        emit Transfer(from, to, value);
    }

    function _setAllowance(address owner, address spender, uint256 value) private {
        require(owner != address(0), "ERC20: approve from the zero address");
        require(spender != address(0), "ERC20: approve to the zero address");
        _allowances[owner][spender] = value;
        emit Approval(owner, spender, value);
    }

    function _transferAuth(
        bytes32 typeHash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) private {
        require(block.timestamp > validAfter, "FiatTokenV2: authorization is not yet valid");
        require(block.timestamp < validBefore, "FiatTokenV2: authorization is expired");
        require(!_nonceSpent[from][nonce], "FiatTokenV2: authorization is used or canceled");

        bytes32 structHash = keccak256(abi.encode(typeHash, from, to, value, validAfter, validBefore, nonce));
        require(_signedBy(from, _digest(structHash), signature), "FiatTokenV2: invalid signature");

        _nonceSpent[from][nonce] = true;
        emit AuthorizationUsed(from, nonce);
        _move(from, to, value);
    }

    function _cancelAuth(address authorizer, bytes32 nonce, bytes memory signature) private {
        require(!_nonceSpent[authorizer][nonce], "FiatTokenV2: authorization is used or canceled");

        bytes32 structHash = keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce));
        require(_signedBy(authorizer, _digest(structHash), signature), "FiatTokenV2: invalid signature");

        _nonceSpent[authorizer][nonce] = true;
        emit AuthorizationCanceled(authorizer, nonce);
    }

    function _digest(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked(hex"1901", DOMAIN_SEPARATOR(), structHash));
    }

    function _pack(uint8 v, bytes32 r, bytes32 s) private pure returns (bytes memory) {
        return abi.encodePacked(r, s, v);
    }

    /// @dev Contract signers are asked via EIP-1271; plain accounts go through a
    ///      strict ECDSA check (65 bytes, v in {27,28}, low s, non-zero signer).
    function _signedBy(address signer, bytes32 digest, bytes memory signature) private view returns (bool) {
        if (signer.code.length > 0) {
            (bool ok, bytes memory ret) =
                signer.staticcall(abi.encodeWithSignature("isValidSignature(bytes32,bytes)", digest, signature));
            return ok && ret.length >= 32 && abi.decode(ret, (bytes32)) == bytes32(_ERC1271_OK);
        }
        return signer != address(0) && _recover(digest, signature) == signer;
    }

    function _recover(bytes32 digest, bytes memory signature) private pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        if (uint256(s) > _HALF_ORDER) return address(0);
        if (v != 27 && v != 28) return address(0);
        return ecrecover(digest, v, r, s);
    }
}
