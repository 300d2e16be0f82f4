// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Metadata} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Metadata.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title MeshEscrow v2: stablecoin lanes between voucher signers (apps) and agents (edge devices)
/// @notice A lane is (signer, agent). The signer is the key that signs EIP-712 vouchers (an app's hot key);
/// the lane's owner is the key that funded it and alone may take money back (a cold key). Vouchers are
/// cumulative and never expire: settling pays the agent what the voucher adds beyond what is settled, as
/// far as the lane holds, then pays the relayer (msg.sender) the voucher's fee increase, at most a tenth of
/// that pay, from what is left.
/// The rules, the lane's storage slot and who can lose what are in docs/settlement.md, "The escrow contract".
contract MeshEscrow is EIP712, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// One storage slot per lane, so settling a voucher writes one slot:
    /// bits 0..95 remaining, 96..191 settled, 192..255 feeSettled (micro-dollars). It lives at
    /// keccak256(abi.encode(signer, agent, LANES_SEED)) (see `_laneSlot`).
    struct Lane {
        uint96 remaining;
        uint96 settled;
        uint64 feeSettled;
    }

    /// Who controls a lane's money, and its pending withdrawal. Never read when settling.
    struct Control {
        address owner;
        uint64 thawEnd; // 0: no withdrawal requested
        uint96 withdrawAmount;
    }

    bytes32 public constant VOUCHER_TYPEHASH =
        keccak256("Voucher(address agent,uint96 cumulative,uint64 feeCumulative,bytes32 receiptsRoot)");
    /// The signer's consent that `owner` may open its lanes (fund them first, and so own them).
    bytes32 public constant LANE_OWNER_TYPEHASH = keccak256("LaneOwner(address owner)");

    /// Packed voucher: cumulative (12) | feeCumulative (8) | receiptsRoot (32) | r (32) | s (32) | v (1).
    uint256 internal constant PACKED = 117;

    uint64 public constant MIN_THAW_SECONDS = 1;
    uint64 public constant MAX_THAW_SECONDS = 365 days;
    uint64 public constant MIN_WITHDRAW_WINDOW_SECONDS = 1 hours;
    uint64 public constant MAX_WITHDRAW_WINDOW_SECONDS = 30 days;

    bytes32 internal constant LANES_SEED = keccak256("MeshEscrow.v2.lanes");
    uint256 internal constant MASK96 = (1 << 96) - 1;
    /// secp256k1n / 2: a larger s is the malleable twin of a valid signature (EIP-2).
    uint256 internal constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    uint8 internal constant SKIP_BAD_SIGNATURE = 1;
    uint8 internal constant SKIP_MALLEABLE_SIGNATURE = 2;
    uint8 internal constant SKIP_STALE = 3;
    uint8 internal constant SKIP_UNFUNDED = 4;
    uint8 internal constant SKIP_FEE_TOO_HIGH = 5;

    /// A voucher's fee total may be at most a tenth of what it pays the agent, and a settlement pays a fee
    /// of at most a tenth of what it pays the agent. The fee goes to whoever sends the transaction, so
    /// without a cap a stolen voucher key could drain its lanes to itself as "fees"; with it, taking 1
    /// through fees means paying the lane's agent 10 that it had not been paid before.
    uint256 public constant FEE_CAP_DIVISOR = 10;

    IERC20 public immutable token;
    /// Time between a withdrawal request and the earliest withdrawal: the agents' time to settle.
    uint64 public immutable thawSeconds;
    /// How long after the thaw a withdrawal may run; later, the request has lapsed.
    uint64 public immutable withdrawWindowSeconds;

    mapping(bytes32 laneId => Control) internal _control;
    /// Payouts whose token transfer failed (a blacklisted or paused payee): the payee claims them later.
    mapping(address payee => uint256) public claimable;
    /// Ed25519 device key registered by each payout address (its binding signature is in the event).
    mapping(address payout => bytes32) public agentKeyOf;

    event LaneFunded(address indexed signer, address indexed agent, address indexed from, uint96 amount, uint96 remaining);
    event LaneOwnerSet(address indexed signer, address indexed agent, address indexed owner);
    event WithdrawRequested(address indexed signer, address indexed agent, uint96 amount, uint64 thawEnd, uint64 lapseAt);
    event WithdrawCancelled(address indexed signer, address indexed agent);
    event Withdrawn(address indexed signer, address indexed agent, address indexed owner, uint96 amount);
    /// The agent got everything the voucher adds (`paid`), and the relayer a fee (`fee`, at most paid / 10).
    event Settled(
        address indexed signer, address indexed agent, uint96 cumulative, uint96 paid, uint64 fee, bytes32 receiptsRoot
    );
    /// The lane ran short: `unpaid` (the agent's part) is paid by the same voucher after a top-up.
    event SettledPartial(
        address indexed signer,
        address indexed agent,
        uint96 cumulative,
        uint96 paid,
        uint64 fee,
        uint256 unpaid,
        bytes32 receiptsRoot
    );
    event SettleSkipped(address indexed signer, address indexed agent, uint8 reason, uint96 cumulative);
    /// A payout transfer failed; the amount waits in `claimable[payee]`.
    event PayoutDeferred(address indexed payee, uint256 amount);
    event Claimed(address indexed payee, uint256 amount);
    event AgentRegistered(address indexed payout, bytes32 indexed edPubKey, bytes bindingSig);

    error ZeroAddress();
    error ZeroAmount();
    error BadPacking(uint256 length);
    error LengthMismatch();
    error BadThaw(uint64 thawSeconds);
    error BadWithdrawWindow(uint64 windowSeconds);
    error BadTokenDecimals(uint8 decimals);
    error NotAToken(address token);
    error NotLaneOwner(address owner);
    error LaneNotOpen();
    error BadOwnerConsent();
    error NoWithdrawPending();
    error StillThawing(uint64 thawEnd);
    error WithdrawLapsed(uint64 lapseAt);
    error NothingToClaim();
    error OutOfGasInPayout();
    error BadAgentKey();

    constructor(IERC20 token_, uint64 thawSeconds_, uint64 withdrawWindowSeconds_) EIP712("EdgeMesh", "2") {
        if (address(token_) == address(0)) revert ZeroAddress();
        if (thawSeconds_ < MIN_THAW_SECONDS || thawSeconds_ > MAX_THAW_SECONDS) revert BadThaw(thawSeconds_);
        if (withdrawWindowSeconds_ < MIN_WITHDRAW_WINDOW_SECONDS || withdrawWindowSeconds_ > MAX_WITHDRAW_WINDOW_SECONDS) {
            revert BadWithdrawWindow(withdrawWindowSeconds_);
        }
        // Amounts are micro-dollars everywhere (vouchers, prices, credit): a token of other decimals would
        // silently scale every payment. try/catch cannot catch a call to an address without code (the
        // caller's own decoding fails), so that case is checked first.
        if (address(token_).code.length == 0) revert NotAToken(address(token_));
        try IERC20Metadata(address(token_)).decimals() returns (uint8 d) {
            if (d != 6) revert BadTokenDecimals(d);
        } catch {
            revert NotAToken(address(token_));
        }
        token = token_;
        thawSeconds = thawSeconds_;
        withdrawWindowSeconds = withdrawWindowSeconds_;
    }

    // ------------------------------------------------------------------ views

    function laneId(address signer, address agent) public pure returns (bytes32 id) {
        assembly ("memory-safe") {
            mstore(0x00, signer)
            mstore(0x20, agent)
            id := keccak256(0x00, 0x40)
        }
    }

    /// @notice Everything an agent needs to decide credit on a lane. `lapseAt` is 0 when no withdrawal is
    /// pending; a request whose `lapseAt` has passed no longer threatens the lane.
    function laneOf(address signer, address agent)
        external
        view
        returns (
            uint96 remaining,
            uint96 settled,
            uint64 feeSettled,
            address owner,
            uint96 withdrawAmount,
            uint64 thawEnd,
            uint64 lapseAt
        )
    {
        Lane memory lane = _lane(signer, agent);
        Control memory c = _control[laneId(signer, agent)];
        remaining = lane.remaining;
        settled = lane.settled;
        feeSettled = lane.feeSettled;
        owner = c.owner;
        if (c.thawEnd != 0) {
            withdrawAmount = c.withdrawAmount;
            thawEnd = c.thawEnd;
            lapseAt = c.thawEnd + withdrawWindowSeconds; // both bounded far below 2^64 (constructor, SafeCast)
        }
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function voucherDigest(address agent, uint96 cumulative, uint64 feeCumulative, bytes32 receiptsRoot)
        external
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, agent, cumulative, feeCumulative, receiptsRoot)));
    }

    function ownerConsentDigest(address owner) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(LANE_OWNER_TYPEHASH, owner)));
    }

    // ---------------------------------------------------------------- funding

    /// @notice Funds the lane (signer, agent) as its owner. On a lane nobody owns yet the caller becomes the
    /// owner, which needs the signer's consent: the caller is the signer, or `consent` is the signer's EIP-712
    /// signature of LaneOwner(owner = caller). On a lane owned by someone else it reverts: a funder never pays
    /// into a lane it does not control by mistake (use `topUpLane` to give).
    function fundLane(address signer, address agent, uint96 amount, bytes calldata consent) external nonReentrant {
        _takeOwnership(signer, agent, consent);
        _credit(signer, agent, amount);
    }

    /// @notice `fundLane` with an EIP-2612 permit. The permit runs in try/catch: if someone front-ran it, the
    /// allowance it set is already there and the transfer still succeeds.
    function fundLaneWithPermit(
        address signer,
        address agent,
        uint96 amount,
        bytes calldata consent,
        uint256 deadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        _takeOwnership(signer, agent, consent);
        _credit(signer, agent, amount);
    }

    /// @notice Anyone may add money to an open lane. It gives the giver no rights: only the owner withdraws,
    /// and a top-up does not touch a pending withdrawal.
    function topUpLane(address signer, address agent, uint96 amount) external nonReentrant {
        if (_control[laneId(signer, agent)].owner == address(0)) revert LaneNotOpen();
        _credit(signer, agent, amount);
    }

    /// @notice The owner hands the lane (its money and any pending withdrawal request) to `newOwner`.
    function transferLaneOwnership(address signer, address agent, address newOwner) external nonReentrant {
        if (newOwner == address(0)) revert ZeroAddress();
        Control storage c = _ownedBy(signer, agent);
        c.owner = newOwner;
        emit LaneOwnerSet(signer, agent, newOwner);
    }

    function _takeOwnership(address signer, address agent, bytes calldata consent) internal {
        if (signer == address(0) || agent == address(0)) revert ZeroAddress();
        Control storage c = _control[laneId(signer, agent)];
        address owner = c.owner;
        if (owner == msg.sender) return;
        if (owner != address(0)) revert NotLaneOwner(owner);
        if (msg.sender != signer) {
            (address who, ECDSA.RecoverError err,) = ECDSA.tryRecover(ownerConsentDigest(msg.sender), consent);
            if (err != ECDSA.RecoverError.NoError || who != signer) revert BadOwnerConsent();
        }
        c.owner = msg.sender;
        emit LaneOwnerSet(signer, agent, msg.sender);
    }

    /// Credits what actually arrived (a fee-on-transfer token delivers less than `amount`), so the escrow
    /// never owes more than it holds.
    function _credit(address signer, address agent, uint96 amount) internal {
        if (amount == 0) revert ZeroAmount();
        uint256 before = token.balanceOf(address(this));
        token.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = token.balanceOf(address(this)) - before;
        if (received == 0) revert ZeroAmount();
        Lane storage lane = _lane(signer, agent);
        // Checked: a lane over 2^96 - 1 micro-dollars reverts instead of wrapping.
        uint96 remaining = lane.remaining + SafeCast.toUint96(received);
        lane.remaining = remaining;
        emit LaneFunded(signer, agent, msg.sender, uint96(received), remaining);
    }

    function _ownedBy(address signer, address agent) internal view returns (Control storage c) {
        c = _control[laneId(signer, agent)];
        address owner = c.owner;
        if (owner == address(0)) revert LaneNotOpen();
        if (owner != msg.sender) revert NotLaneOwner(owner);
    }

    // ------------------------------------------------------------ owner exit

    /// @notice Starts the thaw for taking `amount` back (type(uint96).max: whatever is left then). Replaces a
    /// previous request and restarts its thaw. Settlements keep paying during the thaw.
    function requestWithdraw(address signer, address agent, uint96 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        Control storage c = _ownedBy(signer, agent);
        uint64 thawEnd = SafeCast.toUint64(block.timestamp + thawSeconds);
        c.thawEnd = thawEnd;
        c.withdrawAmount = amount;
        emit WithdrawRequested(signer, agent, amount, thawEnd, thawEnd + withdrawWindowSeconds);
    }

    function cancelWithdraw(address signer, address agent) external nonReentrant {
        Control storage c = _ownedBy(signer, agent);
        if (c.thawEnd == 0) revert NoWithdrawPending();
        c.thawEnd = 0;
        c.withdrawAmount = 0;
        emit WithdrawCancelled(signer, agent);
    }

    /// @notice Pays the owner min(requested, remaining), from the thaw's end until the window closes.
    function withdraw(address signer, address agent) external nonReentrant returns (uint96 amount) {
        Control storage c = _ownedBy(signer, agent);
        uint64 thawEnd = c.thawEnd;
        if (thawEnd == 0) revert NoWithdrawPending();
        if (block.timestamp < thawEnd) revert StillThawing(thawEnd);
        uint256 lapseAt = uint256(thawEnd) + withdrawWindowSeconds;
        if (block.timestamp >= lapseAt) revert WithdrawLapsed(uint64(lapseAt));
        Lane storage lane = _lane(signer, agent);
        uint96 remaining = lane.remaining;
        amount = c.withdrawAmount < remaining ? c.withdrawAmount : remaining;
        lane.remaining = remaining - amount;
        c.thawEnd = 0;
        c.withdrawAmount = 0;
        emit Withdrawn(signer, agent, msg.sender, amount);
        if (amount != 0) token.safeTransfer(msg.sender, amount);
    }

    // ------------------------------------------------------------ settlement

    /// @notice Settles packed vouchers (any signers) for one agent, pays it once and pays the caller the fees.
    /// A stale, unfunded or badly signed voucher is skipped with `SettleSkipped`; the rest of the batch pays.
    /// Anyone may call: the payee is inside each signed voucher.
    function settle(address agent, bytes calldata packed) external nonReentrant returns (uint256 paid, uint256 fees) {
        (paid, fees) = _settleAgent(agent, packed, _domainSeparatorV4());
        _payOut(agent, paid);
        _payOut(msg.sender, fees);
    }

    /// @notice Relayer mode: several agents in one transaction, one transfer per agent at the end. A payee
    /// whose transfer fails does not fail the batch: its amount waits in `claimable`.
    function settleMany(address[] calldata agents, bytes[] calldata packed)
        external
        nonReentrant
        returns (uint256 paid, uint256 fees)
    {
        uint256 n = agents.length;
        if (n != packed.length) revert LengthMismatch();
        bytes32 ds = _domainSeparatorV4();
        uint256[] memory amounts = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            (uint256 a, uint256 f) = _settleAgent(agents[i], packed[i], ds);
            amounts[i] = a;
            paid += a;
            fees += f;
        }
        // Interactions only after every lane is written.
        for (uint256 i; i < n; ++i) {
            _payOut(agents[i], amounts[i]);
        }
        _payOut(msg.sender, fees);
    }

    /// @notice Pays `payee` what failed to reach it earlier. Anyone may call; the money goes to the payee.
    function claim(address payee) external nonReentrant returns (uint256 amount) {
        amount = claimable[payee];
        if (amount == 0) revert NothingToClaim();
        claimable[payee] = 0;
        emit Claimed(payee, amount);
        token.safeTransfer(payee, amount);
    }

    /// A transfer that reverts or returns false leaves the amount claimable instead of failing the batch.
    /// A caller cannot force that by starving the transfer of gas: a failure that leaves under 1/64 of the
    /// gas given (EIP-150) is treated as out of gas and reverts everything.
    function _payOut(address payee, uint256 amount) internal {
        if (amount == 0) return;
        address t = address(token);
        bool ok;
        uint256 gasBefore = gasleft();
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, 0xa9059cbb00000000000000000000000000000000000000000000000000000000) // transfer(address,uint256)
            mstore(add(m, 0x04), payee)
            mstore(add(m, 0x24), amount)
            ok := call(gas(), t, 0, m, 0x44, 0x00, 0x20)
            // Success is: no revert, and either no return data or a 32-byte true.
            if ok {
                switch returndatasize()
                case 0 {}
                case 0x20 { ok := eq(mload(0x00), 1) }
                default { ok := 0 }
            }
        }
        if (ok) return;
        if (gasleft() <= gasBefore / 64) revert OutOfGasInPayout();
        claimable[payee] += amount;
        emit PayoutDeferred(payee, amount);
    }

    function _settleAgent(address agent, bytes calldata packed, bytes32 ds) internal returns (uint256 paid, uint256 fees) {
        if (agent == address(0)) revert ZeroAddress();
        uint256 len = packed.length;
        if (len % PACKED != 0) revert BadPacking(len);
        unchecked {
            // off < len fits calldata; sums of uint96 and uint64 amounts over a calldata-bounded batch fit uint256.
            for (uint256 off; off < len; off += PACKED) {
                (uint256 p, uint256 f) = _settleOne(agent, packed, off, ds);
                paid += p;
                fees += f;
            }
        }
    }

    /// Reads one packed voucher, recovers its signer (one ecrecover) and pays it. Written in assembly because
    /// it runs once per voucher and the gas budget is per voucher (docs/settlement.md, "Gas").
    function _settleOne(address agent, bytes calldata packed, uint256 off, bytes32 ds) internal returns (uint256, uint256) {
        uint256 cumulative;
        uint256 feeCumulative;
        bytes32 root;
        address signer;
        bool malleable;
        bytes32 typehash = VOUCHER_TYPEHASH;
        assembly ("memory-safe") {
            let p := add(packed.offset, off)
            let w := calldataload(p)
            cumulative := shr(160, w) // 12 bytes
            feeCumulative := and(shr(96, w), 0xffffffffffffffff) // 8 bytes
            root := calldataload(add(p, 20))
            // EIP-712: keccak256(0x1901 ‖ ds ‖ keccak256(typehash ‖ agent ‖ cumulative ‖ feeCumulative ‖ root)).
            // Scratch memory past the free memory pointer, never kept.
            let m := mload(0x40)
            mstore(m, typehash)
            mstore(add(m, 0x20), agent)
            mstore(add(m, 0x40), cumulative)
            mstore(add(m, 0x60), feeCumulative)
            mstore(add(m, 0x80), root)
            let structHash := keccak256(m, 0xa0)
            mstore(m, shl(240, 0x1901))
            mstore(add(m, 0x02), ds)
            mstore(add(m, 0x22), structHash)
            let digest := keccak256(m, 0x42)
            let s := calldataload(add(p, 84))
            malleable := gt(s, HALF_N)
            if iszero(malleable) {
                // ecrecover precompile: (digest, v, r, s) -> address, or no output when nothing recovers
                // (a v other than 27 or 28 included); the zero address then stays in the output slot.
                mstore(m, digest)
                mstore(add(m, 0x20), byte(0, calldataload(add(p, 116))))
                mstore(add(m, 0x40), calldataload(add(p, 52)))
                mstore(add(m, 0x60), s)
                mstore(0x00, 0)
                pop(staticcall(gas(), 0x01, m, 0x80, 0x00, 0x20))
                signer := mload(0x00)
            }
        }
        if (signer == address(0)) {
            emit SettleSkipped(address(0), agent, malleable ? SKIP_MALLEABLE_SIGNATURE : SKIP_BAD_SIGNATURE, uint96(cumulative));
            return (0, 0);
        }
        bool feeTooHigh;
        unchecked {
            feeTooHigh = feeCumulative * FEE_CAP_DIVISOR > cumulative; // feeCumulative < 2^64: no overflow
        }
        if (feeTooHigh) {
            emit SettleSkipped(signer, agent, SKIP_FEE_TOO_HIGH, uint96(cumulative));
            return (0, 0);
        }
        return _pay(signer, agent, cumulative, feeCumulative, root);
    }

    /// Pays the agent min(cumulative - settled, remaining), then the relayer's fee increase from what is left.
    /// One slot read, one slot write. `cumulative` < 2^96 and `feeCumulative` < 2^64 (read from 12 and 8 bytes).
    function _pay(address signer, address agent, uint256 cumulative, uint256 feeCumulative, bytes32 root)
        internal
        returns (uint256 paid, uint256 fee)
    {
        bytes32 slot = _laneSlot(signer, agent);
        uint256 word;
        assembly ("memory-safe") {
            word := sload(slot)
        }
        uint256 remaining = word & MASK96;
        uint256 settled = (word >> 96) & MASK96;
        uint256 feeSettled = word >> 192;
        if (cumulative <= settled) {
            // Nothing new for the agent, so no fee either (below): a fee is paid only alongside new pay.
            emit SettleSkipped(signer, agent, SKIP_STALE, uint96(cumulative));
            return (0, 0);
        }
        if (remaining == 0) {
            emit SettleSkipped(signer, agent, SKIP_UNFUNDED, uint96(cumulative));
            return (0, 0);
        }
        unchecked {
            // Each subtraction follows the comparison that guards it; settled + paid <= cumulative < 2^96 and
            // feeSettled + fee <= feeCumulative < 2^64, so every field still fits its bits.
            paid = cumulative - settled;
            if (paid > remaining) paid = remaining;
            settled += paid;
            remaining -= paid;
            if (feeCumulative > feeSettled) {
                // At most a tenth of what this settlement pays the agent: the signer, settling its own
                // vouchers, cannot take back a tenth of everything the lane ever paid, only of new pay.
                fee = feeCumulative - feeSettled;
                if (fee > paid / FEE_CAP_DIVISOR) fee = paid / FEE_CAP_DIVISOR;
                if (fee > remaining) fee = remaining;
                feeSettled += fee;
                remaining -= fee;
            }
        }
        assembly ("memory-safe") {
            sstore(slot, or(or(shl(192, feeSettled), shl(96, settled)), remaining))
        }
        if (settled >= cumulative) {
            // emit Settled(signer, agent, cumulative, paid, fee, root), without the ABI encoder's copying.
            bytes32 topic = Settled.selector;
            assembly ("memory-safe") {
                let m := mload(0x40)
                mstore(m, cumulative)
                mstore(add(m, 0x20), paid)
                mstore(add(m, 0x40), fee)
                mstore(add(m, 0x60), root)
                log3(m, 0x80, topic, signer, agent)
            }
        } else {
            uint256 unpaid;
            unchecked {
                unpaid = cumulative - settled; // the agent's part that waits for a top-up; cumulative > settled here
            }
            emit SettledPartial(signer, agent, uint96(cumulative), uint96(paid), uint64(fee), unpaid, root);
        }
    }

    /// Where lane (signer, agent) is stored: one keccak256 on the settle path. Its 96-byte preimage cannot
    /// collide with Solidity's own mapping slots, whose preimages are 64 bytes.
    function _laneSlot(address signer, address agent) internal pure returns (bytes32 slot) {
        bytes32 seed = LANES_SEED;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, signer)
            mstore(add(m, 0x20), agent)
            mstore(add(m, 0x40), seed)
            slot := keccak256(m, 0x60)
        }
    }

    function _lane(address signer, address agent) internal pure returns (Lane storage lane) {
        bytes32 slot = _laneSlot(signer, agent);
        assembly ("memory-safe") {
            lane.slot := slot
        }
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
