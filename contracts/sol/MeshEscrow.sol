// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title MeshEscrow: stablecoin lanes between payers (apps) and agents (edge devices)
/// @notice A payer funds a lane (payer, agent). The payer signs EIP-712 vouchers for the running total owed;
/// anyone may settle them, and the escrow pays each agent the increase since the last settled voucher.
/// A payer leaves by requesting a withdrawal, waiting out the thaw period (during which the agent can still
/// settle), and withdrawing what is left.
contract MeshEscrow is EIP712, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// One storage slot per lane, so settling a voucher writes one slot.
    struct Lane {
        uint128 remaining;
        uint128 settled;
    }

    bytes32 public constant VOUCHER_TYPEHASH =
        keccak256("Voucher(address agent,uint128 cumulative,bytes32 receiptsRoot,uint64 expiry)");

    /// Packed voucher: cumulative (16) | expiry (8) | receiptsRoot (32) | r (32) | s (32) | v (1).
    uint256 internal constant PACKED = 121;

    uint8 internal constant SKIP_BAD_SIGNATURE = 1;
    uint8 internal constant SKIP_MALLEABLE_SIGNATURE = 2;
    uint8 internal constant SKIP_EXPIRED = 3;
    uint8 internal constant SKIP_STALE = 4;
    uint8 internal constant SKIP_OVERSPEND = 5;

    IERC20 public immutable token;
    uint64 public immutable thawSeconds;

    mapping(bytes32 laneId => Lane) internal _lanes;
    /// Written only when a payer asks to leave.
    mapping(bytes32 laneId => uint64) internal _thawEnd;
    /// Ed25519 device key registered by each payout address (its binding signature is in the event).
    mapping(address payout => bytes32) public agentKeyOf;

    event LaneFunded(address indexed payer, address indexed agent, uint128 amount, uint128 remaining);
    event WithdrawRequested(address indexed payer, address indexed agent, uint128 remaining, uint64 thawEnd);
    event WithdrawCancelled(address indexed payer, address indexed agent);
    event Withdrawn(address indexed payer, address indexed agent, uint128 amount);
    event Settled(address indexed payer, address indexed agent, uint128 cumulative, uint128 delta, bytes32 receiptsRoot);
    event SettleSkipped(address indexed payer, address indexed agent, uint8 reason, uint128 cumulative);
    event AgentRegistered(address indexed payout, bytes32 indexed edPubKey, bytes bindingSig);

    error ZeroAddress();
    error ZeroAmount();
    error BadPacking(uint256 length);
    error LengthMismatch();
    error NoWithdrawPending();
    error WithdrawAlreadyPending(uint64 thawEnd);
    error StillThawing(uint64 thawEnd);
    error BadAgentKey();

    constructor(IERC20 token_, uint64 thawSeconds_) EIP712("EdgeMesh", "1") {
        if (address(token_) == address(0)) revert ZeroAddress();
        token = token_;
        thawSeconds = thawSeconds_;
    }

    // ------------------------------------------------------------------ views

    function laneId(address payer, address agent) public pure returns (bytes32 id) {
        assembly ("memory-safe") {
            mstore(0x00, payer)
            mstore(0x20, agent)
            id := keccak256(0x00, 0x40)
        }
    }

    function laneOf(address payer, address agent) external view returns (uint128 remaining, uint128 settled, uint64 thawEnd) {
        bytes32 id = laneId(payer, agent);
        Lane memory lane = _lanes[id];
        return (lane.remaining, lane.settled, _thawEnd[id]);
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function voucherDigest(address agent, uint128 cumulative, bytes32 receiptsRoot, uint64 expiry) external view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, agent, cumulative, receiptsRoot, expiry)));
    }

    // ---------------------------------------------------------------- funding

    function fundLane(address agent, uint128 amount) external nonReentrant {
        _fund(agent, amount);
    }

    /// @notice Funds with an EIP-2612 permit. The permit runs in try/catch: if someone front-ran it, the
    /// allowance it set is already there and the transfer still succeeds.
    function fundLaneWithPermit(address agent, uint128 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
    {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        _fund(agent, amount);
    }

    function _fund(address agent, uint128 amount) internal {
        if (agent == address(0)) revert ZeroAddress();
        if (amount == 0) revert ZeroAmount();
        bytes32 id = laneId(msg.sender, agent);
        Lane storage lane = _lanes[id];
        uint128 remaining = lane.remaining + amount;
        lane.remaining = remaining;
        if (_thawEnd[id] != 0) {
            // New money means the payer is staying.
            delete _thawEnd[id];
            emit WithdrawCancelled(msg.sender, agent);
        }
        emit LaneFunded(msg.sender, agent, amount, remaining);
        // The only external call comes last; nonReentrant covers a token that calls back.
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    // ------------------------------------------------------------ payer exit

    function requestWithdraw(address agent) external nonReentrant {
        bytes32 id = laneId(msg.sender, agent);
        uint64 pending = _thawEnd[id];
        if (pending != 0) revert WithdrawAlreadyPending(pending);
        uint64 thawEnd = uint64(block.timestamp) + thawSeconds;
        _thawEnd[id] = thawEnd;
        emit WithdrawRequested(msg.sender, agent, _lanes[id].remaining, thawEnd);
    }

    function cancelWithdraw(address agent) external nonReentrant {
        bytes32 id = laneId(msg.sender, agent);
        if (_thawEnd[id] == 0) revert NoWithdrawPending();
        delete _thawEnd[id];
        emit WithdrawCancelled(msg.sender, agent);
    }

    /// @notice After the thaw, returns everything left on the lane. Vouchers settled later find nothing left.
    function withdraw(address agent) external nonReentrant returns (uint128 amount) {
        bytes32 id = laneId(msg.sender, agent);
        uint64 thawEnd = _thawEnd[id];
        if (thawEnd == 0) revert NoWithdrawPending();
        if (block.timestamp < thawEnd) revert StillThawing(thawEnd);
        amount = _lanes[id].remaining;
        _lanes[id].remaining = 0;
        delete _thawEnd[id];
        emit Withdrawn(msg.sender, agent, amount);
        if (amount != 0) token.safeTransfer(msg.sender, amount);
    }

    // ------------------------------------------------------------ settlement

    /// @notice Settles packed vouchers (any number of payers) for one agent and pays it once.
    /// A voucher that is stale, expired, over the lane's balance or badly signed is skipped with
    /// `SettleSkipped`; the rest of the batch still pays. Anyone may call: the payee is in the voucher.
    function settle(address agent, bytes calldata packed) external nonReentrant returns (uint256 paid) {
        paid = _settleAgent(agent, packed, _domainSeparatorV4());
        if (paid != 0) token.safeTransfer(agent, paid);
    }

    /// @notice Relayer mode: several agents in one transaction, one transfer per agent at the end.
    function settleMany(address[] calldata agents, bytes[] calldata packed) external nonReentrant returns (uint256 paid) {
        uint256 n = agents.length;
        if (n != packed.length) revert LengthMismatch();
        bytes32 ds = _domainSeparatorV4();
        uint256[] memory amounts = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            uint256 a = _settleAgent(agents[i], packed[i], ds);
            amounts[i] = a;
            paid += a;
        }
        // Interactions only after every lane is written.
        for (uint256 i; i < n; ++i) {
            if (amounts[i] != 0) token.safeTransfer(agents[i], amounts[i]);
        }
    }

    function _settleAgent(address agent, bytes calldata packed, bytes32 ds) internal returns (uint256 total) {
        if (agent == address(0)) revert ZeroAddress();
        uint256 len = packed.length;
        if (len % PACKED != 0) revert BadPacking(len);
        unchecked {
            // off < len fits calldata; a sum of uint128 deltas over a calldata-bounded batch fits uint256.
            for (uint256 off; off < len; off += PACKED) {
                total += _settleOne(agent, packed, off, ds);
            }
        }
    }

    function _settleOne(address agent, bytes calldata packed, uint256 off, bytes32 ds) internal returns (uint128) {
        uint128 cumulative;
        uint64 expiry;
        bytes32 root;
        assembly ("memory-safe") {
            let p := add(packed.offset, off)
            let w := calldataload(p)
            cumulative := shr(128, w)
            expiry := and(shr(64, w), 0xffffffffffffffff)
            root := calldataload(add(p, 24))
        }
        (address payer, ECDSA.RecoverError err) = _signer(_digest(ds, agent, cumulative, root, expiry), packed, off);
        if (err != ECDSA.RecoverError.NoError) {
            emit SettleSkipped(
                address(0),
                agent,
                err == ECDSA.RecoverError.InvalidSignatureS ? SKIP_MALLEABLE_SIGNATURE : SKIP_BAD_SIGNATURE,
                cumulative
            );
            return 0;
        }
        if (block.timestamp > expiry) {
            emit SettleSkipped(payer, agent, SKIP_EXPIRED, cumulative);
            return 0;
        }
        return _pay(payer, agent, cumulative, root);
    }

    /// EIP-712 digest of Voucher(agent, cumulative, receiptsRoot, expiry) under the domain separator `ds`.
    function _digest(bytes32 ds, address agent, uint128 cumulative, bytes32 root, uint64 expiry)
        internal
        pure
        returns (bytes32)
    {
        bytes32 structHash;
        bytes32 typehash = VOUCHER_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, typehash)
            mstore(add(m, 0x20), agent)
            mstore(add(m, 0x40), cumulative)
            mstore(add(m, 0x60), root)
            mstore(add(m, 0x80), expiry)
            structHash := keccak256(m, 0xa0)
        }
        return MessageHashUtils.toTypedDataHash(ds, structHash);
    }

    /// One ecrecover; OpenZeppelin refuses high-s (malleable) signatures and the zero address.
    function _signer(bytes32 digest, bytes calldata packed, uint256 off) internal pure returns (address, ECDSA.RecoverError) {
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            let p := add(packed.offset, off)
            r := calldataload(add(p, 56))
            s := calldataload(add(p, 88))
            v := byte(0, calldataload(add(p, 120)))
        }
        (address payer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, v, r, s);
        return (payer, err);
    }

    /// Pays the lane's increase, or skips a stale or overspending voucher. One slot read, one slot write.
    function _pay(address payer, address agent, uint128 cumulative, bytes32 root) internal returns (uint128 delta) {
        bytes32 id = laneId(payer, agent);
        uint256 word;
        bytes32 slot;
        assembly ("memory-safe") {
            // _lanes[id]: Lane packs `remaining` in the low 128 bits and `settled` in the high 128 bits.
            mstore(0x00, id)
            mstore(0x20, _lanes.slot)
            slot := keccak256(0x00, 0x40)
            word := sload(slot)
        }
        uint128 remaining = uint128(word);
        uint128 settled = uint128(word >> 128);
        if (cumulative <= settled) {
            emit SettleSkipped(payer, agent, SKIP_STALE, cumulative);
            return 0;
        }
        unchecked {
            delta = cumulative - settled; // cumulative > settled
        }
        if (delta > remaining) {
            emit SettleSkipped(payer, agent, SKIP_OVERSPEND, cumulative);
            return 0;
        }
        unchecked {
            word = (uint256(cumulative) << 128) | uint256(remaining - delta); // delta <= remaining
        }
        assembly ("memory-safe") {
            sstore(slot, word)
        }
        emit Settled(payer, agent, cumulative, delta, root);
    }

    // --------------------------------------------------------------- registry

    /// @notice Binds msg.sender (the payout address) to an agent's Ed25519 device key. `bindingSig` is the
    /// device key's signature over keccak256(abi.encodePacked("MESH_BIND", chainId, escrow, payout)); it is
    /// stored in the event and checked off-chain by clients (Ed25519 is too costly to verify here).
    function registerAgent(bytes32 edPubKey, bytes calldata bindingSig) external {
        if (edPubKey == bytes32(0) || bindingSig.length != 64) revert BadAgentKey();
        agentKeyOf[msg.sender] = edPubKey;
        emit AgentRegistered(msg.sender, edPubKey, bindingSig);
    }
}
