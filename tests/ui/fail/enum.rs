use outbox_core::Publish;

#[derive(Publish)]
#[publish(destination = "/topic/orders")]
pub enum Order {
    Placed { id: i32 },
    Cancelled { id: i32 },
}

fn main() {
    // The derive still emits an impl, so using it adds no follow-up error.
    fn publishes<T: Publish>() {}
    publishes::<Order>();
}
