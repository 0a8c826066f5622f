use outbox_core::Publish;

#[derive(Publish)]
#[publish(destination = "/topic/orders")]
pub struct Order(pub i32, pub String);

fn main() {
    // The derive still emits an impl, so using it adds no follow-up error.
    fn publishes<T: Publish>() {}
    publishes::<Order>();
}
